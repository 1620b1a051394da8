"""EfficientDet-D1 (official `efficientdet-d1`).

From `efficientdet/hparams_config.py: efficientdet_model_param_dict`.

python -m effdet_jax.tools.summary --config=configs/d1.py
"""

from effdet_jax import config_files

base = config_files.load_module('base', near=__file__)


def get_config(arg: str | None = None):
  config_files.parse_arg(arg, (), __file__)  # takes none: FILE:x fails
  return base.get_config('efficientdet-d1')
