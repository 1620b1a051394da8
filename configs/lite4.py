"""EfficientDet-Lite4 (official `efficientdet-lite4`, fact sheet §1.2).

python -m effdet_jax.tools.summary --config=configs/lite4.py
"""

from configs import base


def get_config(arg: str | None = None):
  del arg
  return base.get_config('efficientdet-lite4')
