"""EfficientDet-D6 (official `efficientdet-d6`, fact sheet §1.1).

python -m effdet_jax.tools.summary --config=configs/d6.py
"""

from configs import base


def get_config(arg: str | None = None):
  del arg
  config = base.get_config('efficientdet-d6')
  # The official large-model recipe: bf16 compute, recomputed activations.
  config.model.dtype = 'bfloat16'
  config.train.remat = True
  return config
