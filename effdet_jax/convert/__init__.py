"""Converters from official / third-party weights to our variables."""

from __future__ import annotations

from effdet_jax import api
from effdet_jax.convert import (
  effdet_torch,
  keras_h5,
  tf_backbone,
  tf_checkpoint,
  torch_backbone,
)
from effdet_jax.convert.effdet_torch import convert_effdet_state_dict
from effdet_jax.convert.keras_h5 import convert_keras_h5
from effdet_jax.convert.strict_fill import ConversionError, Report
from effdet_jax.convert.tf_backbone import convert_tf_backbone
from effdet_jax.convert.tf_checkpoint import convert_tf_checkpoint
from effdet_jax.convert.torch_backbone import convert_torch_backbone

__all__ = [
  'BACKBONE_SOURCES',
  'SOURCES',
  'ConversionError',
  'Report',
  'convert',
  'convert_effdet_state_dict',
  'convert_keras_h5',
  'convert_tf_backbone',
  'convert_tf_checkpoint',
  'convert_torch_backbone',
]

# tf: official checkpoint folder; keras: official .h5 weights; tf-backbone:
# EfficientNet(-lite) checkpoint -> backbone only; effdet: PyTorch state dict;
# torch-backbone: efficientnet_pytorch-named EfficientNet(-lite) state dict ->
# backbone, the rest fresh.
SOURCES = ('tf', 'keras', 'tf-backbone', 'effdet', 'torch-backbone')
# Sources that give a backbone only (`init_from.kind='backbone'`).
BACKBONE_SOURCES = ('tf-backbone', 'torch-backbone')


def convert(
  source: str,
  input_path: str,
  model_cfg,
  ema: bool = True,
  allow_missing: str = '',
  with_report: bool = False,
):
  """Our variables for `model_cfg` read from `input_path`.

  `tf-backbone` gives only the backbone part (`{'params': {'backbone':
  ...}, 'batch_stats': {'backbone': ...}}`); `torch-backbone` the whole
  tree, the backbone read and every other leaf fresh (seed 0).
  `allow_missing` (regex, re.match on official names; state-dict names for
  `torch-backbone`) lists intended gaps; targets it covers that the source
  lacks are freshly initialised (seed 0). With `with_report`, returns
  `(variables, Report)`.
  """
  model = api.build_model(model_cfg)
  abstract = api.abstract_variables(model)
  fallback = api.init_variables(model) if allow_missing else None
  bb = model_cfg.backbone_name
  if source == 'tf':
    out = tf_checkpoint.convert_tf_checkpoint(
      input_path, abstract, bb, ema, allow_missing, fallback, True
    )
  elif source == 'keras':
    out = keras_h5.convert_keras_h5(
      input_path, abstract, bb, allow_missing, fallback, True
    )
  elif source == 'tf-backbone':
    out = tf_backbone.convert_tf_backbone(
      input_path, abstract, bb, ema, allow_missing, with_report=True
    )
  elif source == 'effdet':
    if allow_missing:
      raise ValueError('--allow-missing is not supported for effdet')
    variables = effdet_torch.convert_effdet_file(input_path, abstract, model)
    out = (variables, None)
  elif source == 'torch-backbone':
    out = torch_backbone.convert_torch_backbone(
      input_path, model, abstract, allow_missing, fallback
    )
  else:
    raise ValueError(f'unknown source {source!r}; valid: {SOURCES}')
  return out if with_report else out[0]
