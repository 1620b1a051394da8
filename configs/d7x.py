"""EfficientDet-D7x (official `efficientdet-d7x`, fact sheet §1.1).

python -m effdet_jax.tools.summary --config=configs/d7x.py
"""

from configs import base


def get_config(arg: str | None = None):
  del arg
  return base.get_config('efficientdet-d7x')
