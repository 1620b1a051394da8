"""Official Keras `.h5` weights (`model.save_weights`) -> our variables.

The released `efficientdet-dN.h5` files hold the EMA weights: the official
`efficientdet/tf2/inspector.py: main` (mode 'dry', `--export_ckpt`) loads
the EMA values through `efficientdet/tf2/util_keras.py: restore_ckpt`, then
calls `save_weights`. Layout, as written by Keras 2 `save_weights` and
checked on `shared/oracle/official-d0-256/model.h5`: the root attribute
`layer_names` lists the top-level layers (`efficientnet-b0`, `resample_p6`,
`resample_p7`, `fpn_cells`, `class_net`, `box_net`); each layer group's
attribute `weight_names` lists full variable names with a `:0` suffix
(`efficientnet-b0/stem/conv2d/kernel:0`), stored as datasets at
`<layer>/<weight name>`. The names are the official TF1 checkpoint names
(the layer scopes of `efficientdet/tf2/efficientdet_keras.py: EfficientDetNet`
and `efficientdet/backbone/efficientnet_model.py: Model`), so the rename
table is the one of `tf_checkpoint`. Read with h5py; Keras is not needed.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping

import numpy as np

from effdet_jax import files
from effdet_jax.convert import strict_fill, tf_checkpoint


def _text(x) -> str:
  return x.decode('utf8') if isinstance(x, bytes) else str(x)


def read_h5_weights(path: str) -> dict[str, np.ndarray]:
  """{official variable name (no `:0`): array} of a Keras weights file."""
  import h5py

  out = {}
  # A URL (gs://...) is read whole into memory: h5py opens local files and
  # file objects (a GFile stream would be read in many small requests).
  source = io.BytesIO(files.read_bytes(path)) if files.is_remote(path) else path
  with h5py.File(source, 'r') as f:
    root = f['model_weights'] if 'model_weights' in f else f  # model.save
    if 'layer_names' not in root.attrs:
      raise strict_fill.ConversionError(
        f'{path} is not a Keras weights file (no `layer_names` attribute)'
      )
    for layer in root.attrs['layer_names']:
      group = root[_text(layer)]
      for weight in group.attrs.get('weight_names', []):
        weight = _text(weight)
        name = weight[:-2] if weight.endswith(':0') else weight
        if name in out:
          raise strict_fill.ConversionError(f'{path}: {name} appears twice')
        out[name] = np.asarray(group[weight])
  return out


def convert_keras_h5(
  path: str,
  abstract: Mapping,
  backbone_name: str,
  allow_missing: str = '',
  fallback: Mapping | None = None,
  with_report: bool = False,
  ignore: Callable[[str], bool] | None = None,
):
  """Reads an official `.h5` weights file into a tree like `abstract`.

  Strict like `tf_checkpoint.convert_tf_checkpoint`: every target needs a
  tensor and every tensor a target, except `allow_missing` (regex, re.match)
  gaps (filled from `fallback`) and names `ignore` accepts.
  """
  weights = read_h5_weights(path)
  bn = tf_checkpoint.bn_modules(abstract)

  def rule(p):
    name = tf_checkpoint.official_name(p, backbone_name, p[1:-1] in bn)
    return name, lambda a: a

  skip = (lambda n, used: ignore(n)) if ignore else None
  variables, report = strict_fill.fill_report(
    abstract,
    rule,
    weights.__getitem__,
    weights,
    skip,
    allow_missing=allow_missing,
    fallback=fallback,
  )
  return (variables, report) if with_report else variables
