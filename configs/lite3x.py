"""EfficientDet-Lite3x (official `efficientdet-lite3x`, fact sheet §1.2).

python -m effdet_jax.tools.summary --config=configs/lite3x.py
"""

from configs import base


def get_config(arg: str | None = None):
  del arg
  return base.get_config('efficientdet-lite3x')
