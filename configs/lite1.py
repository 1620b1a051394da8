"""EfficientDet-Lite1 (official `efficientdet-lite1`, fact sheet §1.2).

python -m effdet_jax.tools.summary --config=configs/lite1.py
"""

from configs import base


def get_config(arg: str | None = None):
  del arg
  return base.get_config('efficientdet-lite1')
