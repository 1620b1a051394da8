"""EfficientDet-Lite0 (official `efficientdet-lite0`, fact sheet §1.2).

python -m effdet_jax.tools.summary --config=configs/lite0.py
"""

from configs import base


def get_config(arg: str | None = None):
  del arg
  return base.get_config('efficientdet-lite0')
