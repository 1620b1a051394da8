"""EfficientDet-D7 (official `efficientdet-d7`).

From `efficientdet/hparams_config.py: efficientdet_model_param_dict`.

python -m effdet_jax.tools.summary --config=configs/d7.py
"""

from effdet_jax import config_files

base = config_files.load_module('base', near=__file__)


def get_config(arg: str | None = None):
  config_files.parse_arg(arg, (), __file__)  # takes none: FILE:x fails
  config = base.get_config('efficientdet-d7')
  # The official large-model recipe: bf16 compute, recomputed activations.
  config.model.dtype = 'bfloat16'
  config.train.remat = True
  return config
