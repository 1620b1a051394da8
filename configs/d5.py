"""EfficientDet-D5 (official `efficientdet-d5`, fact sheet §1.1).

python -m effdet_jax.tools.summary --config=configs/d5.py
"""

from configs import base


def get_config(arg: str | None = None):
  del arg
  return base.get_config('efficientdet-d5')
