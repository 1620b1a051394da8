"""EfficientDet-D7x (official `efficientdet-d7x`).

From `efficientdet/hparams_config.py: efficientdet_model_param_dict`.

python -m effdet_jax.tools.summary --config=configs/d7x.py
"""

from effdet_jax import config_files

base = config_files.load_module('base', near=__file__)


def get_config(arg: str | None = None):
  config_files.parse_arg(arg, (), __file__)  # takes none: FILE:x fails
  config = base.get_config('efficientdet-d7x')
  # The official large-model recipe: bf16 compute, recomputed activations.
  config.model.dtype = 'bfloat16'
  config.train.remat = True
  return config
