"""Named EfficientDet models and their official hyper-parameters.

Source: google/automl `efficientdet/hparams_config.py` at 6a54c874
(`default_detection_configs`, `efficientdet_model_param_dict`,
`efficientdet_lite_param_dict`, `lite_common_param`).
Model code never branches on these names: everything is a field.
"""

from __future__ import annotations

import copy
from typing import Any

# Architecture defaults shared by all models (`default_detection_configs`).
DEFAULTS: dict[str, Any] = {
  'act_type': 'swish',
  'min_level': 3,
  'max_level': 7,
  'num_scales': 3,
  'aspect_ratios': (1.0, 2.0, 0.5),
  'anchor_scale': 4.0,
  'num_classes': 90,
  'fpn_weight_method': 'fastattn',  # official None -> 'fastattn'
  'separable_conv': True,
  'apply_bn_for_resampling': True,
  'conv_after_downsample': False,
  'conv_bn_act_pattern': False,
  'survival_prob': None,  # head drop-connect (official hparam survival_prob)
  'mean_rgb': (0.485 * 255, 0.456 * 255, 0.406 * 255),
  'stddev_rgb': (0.229 * 255, 0.224 * 255, 0.225 * 255),
  'scale_range': False,
}

# name: (backbone, image_size, fpn_num_filters, fpn_cell_repeats,
#        box_class_repeats, anchor_scale, max_level, fpn_weight_method)
_D_MODELS = {
  'efficientdet-d0': ('efficientnet-b0', 512, 64, 3, 3, 4.0, 7, 'fastattn'),
  'efficientdet-d1': ('efficientnet-b1', 640, 88, 4, 3, 4.0, 7, 'fastattn'),
  'efficientdet-d2': ('efficientnet-b2', 768, 112, 5, 3, 4.0, 7, 'fastattn'),
  'efficientdet-d3': ('efficientnet-b3', 896, 160, 6, 4, 4.0, 7, 'fastattn'),
  'efficientdet-d4': ('efficientnet-b4', 1024, 224, 7, 4, 4.0, 7, 'fastattn'),
  'efficientdet-d5': ('efficientnet-b5', 1280, 288, 7, 4, 4.0, 7, 'fastattn'),
  'efficientdet-d6': ('efficientnet-b6', 1280, 384, 8, 5, 4.0, 7, 'sum'),
  'efficientdet-d7': ('efficientnet-b6', 1536, 384, 8, 5, 5.0, 7, 'sum'),
  'efficientdet-d7x': ('efficientnet-b7', 1536, 384, 8, 5, 4.0, 8, 'sum'),
}

# Lite models: `efficientdet_lite_param_dict` + `lite_common_param`.
_LITE_COMMON = {
  'mean_rgb': (127.0, 127.0, 127.0),
  'stddev_rgb': (128.0, 128.0, 128.0),
  'act_type': 'relu6',
  'fpn_weight_method': 'sum',
}
# name: (backbone, image_size, fpn_num_filters, fpn_cell_repeats,
#        box_class_repeats, anchor_scale)
_LITE_MODELS = {
  'efficientdet-lite0': ('efficientnet-lite0', 320, 64, 3, 3, 3.0),
  'efficientdet-lite1': ('efficientnet-lite1', 384, 88, 4, 3, 3.0),
  'efficientdet-lite2': ('efficientnet-lite2', 448, 112, 5, 3, 3.0),
  'efficientdet-lite3': ('efficientnet-lite3', 512, 160, 6, 4, 4.0),
  'efficientdet-lite3x': ('efficientnet-lite3', 640, 200, 6, 4, 3.0),
  'efficientdet-lite4': ('efficientnet-lite4', 640, 224, 7, 4, 4.0),
}


def _build() -> dict[str, dict[str, Any]]:
  table = {}
  for name, (bb, size, nf, cr, hr, scale, max_level, wm) in _D_MODELS.items():
    table[name] = {
      **DEFAULTS,
      'name': name,
      'backbone_name': bb,
      'image_size': (size, size),
      'fpn_num_filters': nf,
      'fpn_cell_repeats': cr,
      'box_class_repeats': hr,
      'anchor_scale': scale,
      'max_level': max_level,
      'fpn_weight_method': wm,
    }
  for name, (bb, size, nf, cr, hr, scale) in _LITE_MODELS.items():
    table[name] = {
      **DEFAULTS,
      **_LITE_COMMON,
      'name': name,
      'backbone_name': bb,
      'image_size': (size, size),
      'fpn_num_filters': nf,
      'fpn_cell_repeats': cr,
      'box_class_repeats': hr,
      'anchor_scale': scale,
    }
  return table


_MODELS = _build()


def model_names() -> list[str]:
  """All registered model names."""
  return list(_MODELS)


def get_model_params(name: str) -> dict[str, Any]:
  """The official hyper-parameters of a named model (a fresh copy).

  Raises:
    ValueError: for an unknown name; the message lists the valid ones.
  """
  if name not in _MODELS:
    raise ValueError(
      f'unknown model {name!r}; valid names: {", ".join(model_names())}'
    )
  return copy.deepcopy(_MODELS[name])


def parse_image_size(size: Any) -> tuple[int, int]:
  """(H, W) from an int, an (H, W) sequence or the official 'WxH' string."""
  if isinstance(size, int):
    return size, size
  if isinstance(size, str):
    w, h = size.lower().split('x')
    return int(h), int(w)
  h, w = size
  return int(h), int(w)
