"""EfficientDet-D1 (official `efficientdet-d1`, fact sheet §1.1).

python -m effdet_jax.tools.summary --config=configs/d1.py
"""

from configs import base


def get_config(arg: str | None = None):
  del arg
  return base.get_config('efficientdet-d1')
