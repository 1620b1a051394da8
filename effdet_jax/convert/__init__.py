"""Converters from official / third-party weights to our variables."""

from __future__ import annotations

import jax

from effdet_jax import api
from effdet_jax.convert import effdet_torch, tf_checkpoint
from effdet_jax.convert.effdet_torch import convert_effdet_state_dict
from effdet_jax.convert.strict_fill import ConversionError
from effdet_jax.convert.tf_checkpoint import convert_tf_checkpoint

__all__ = [
  'ConversionError',
  'convert',
  'convert_effdet_state_dict',
  'convert_tf_checkpoint',
]


def convert(source: str, input_path: str, model_cfg, ema: bool = True) -> dict:
  """Our variables for `model_cfg` read from `input_path`."""
  model = api.build_model(model_cfg)
  abstract = jax.eval_shape(lambda: api.init_variables(model))
  if source == 'tf':
    return tf_checkpoint.convert_tf_checkpoint(
      input_path, abstract, model_cfg.backbone_name, ema=ema
    )
  if source == 'effdet':
    return effdet_torch.convert_effdet_file(input_path, abstract, model)
  raise ValueError(f'unknown source {source!r}')
