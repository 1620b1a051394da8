"""Official google/automl name-based TF checkpoints -> our variables.

Names are the official scopes (the layer names of
`efficientdet/tf2/efficientdet_keras.py: EfficientDetNet` and
`efficientdet/backbone/efficientnet_model.py: Model`) with our `backbone`
prefix replaced by the backbone name and BN leaves renamed; kernels already
have the TF layouts we keep. EMA shadows (`<name>/ExponentialMovingAverage`)
are used by default, as the official evaluation and inference do
(`efficientdet/inference.py: restore_ckpt`,
`efficientdet/tf2/util_keras.py: restore_ckpt`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np

from effdet_jax.convert import strict_fill

_BN_LEAVES = {
  'scale': 'gamma',
  'bias': 'beta',
  'mean': 'moving_mean',
  'var': 'moving_variance',
}
EMA_SUFFIX = '/ExponentialMovingAverage'
# Never weights: step counter and optimizer slots.
_NOT_WEIGHTS = r'(global_step|.*/Momentum|.*/RMSProp(_1)?|.*_CHECKPOINTABLE.*)'


def official_name(
  path: tuple[str, ...], backbone_name: str, is_bn: bool
) -> str:
  """Official variable name of our flattened path (collection first)."""
  _, *scopes, leaf = path
  if scopes and scopes[0] == 'backbone':
    scopes[0] = backbone_name
  if is_bn:
    leaf = _BN_LEAVES[leaf]
  return '/'.join(scopes + [leaf])


def bn_modules(abstract: Mapping) -> set[tuple[str, ...]]:
  """Module paths (without collection) that hold BN `scale` parameters."""
  from flax import traverse_util

  return {
    p[1:-1]
    for p in traverse_util.flatten_dict(dict(abstract))
    if p[0] == 'params' and p[-1] == 'scale'
  }


def convert_tf_checkpoint(
  ckpt_path: str,
  abstract: Mapping,
  backbone_name: str,
  ema: bool = True,
  allow_missing: str = '',
  fallback: Mapping | None = None,
  with_report: bool = False,
  ignore: Callable[[str], bool] | None = None,
):
  """Reads an official checkpoint into a tree shaped like `abstract`.

  Args:
    ckpt_path: checkpoint folder or prefix (as `tf.train.load_checkpoint`).
    abstract: our variables or `jax.eval_shape` of them (a part of the tree,
      e.g. only the backbone, reads only that part).
    backbone_name: e.g. 'efficientnet-b0' (the checkpoint's backbone scope).
    ema: read the `/ExponentialMovingAverage` shadows (True) or the raw
      weights (False). With ema=True a variable without a shadow is an error.
    allow_missing: regex of intended gaps (see `strict_fill.fill_report`).
    fallback: values for allowed-missing targets.
    with_report: return `(variables, strict_fill.Report)`.
    ignore: more source names that may stay unused silently.
  """
  import tensorflow as tf

  reader = tf.train.load_checkpoint(ckpt_path)
  names = set(reader.get_variable_to_shape_map())
  bn = bn_modules(abstract)
  has_ema = any(n.endswith(EMA_SUFFIX) for n in names)
  if ema and not has_ema:
    raise strict_fill.ConversionError(
      f'{ckpt_path} has no {EMA_SUFFIX} shadows; convert with --ema=false'
    )

  def rule(path):
    name = official_name(path, backbone_name, path[1:-1] in bn)
    return (name + EMA_SUFFIX if ema else name), lambda a: a

  def skip(name: str, used: set[str]) -> bool:
    # The copy we did not read is fine to skip only where we read its twin.
    if re.fullmatch(_NOT_WEIGHTS, name) or (ignore and ignore(name)):
      return True
    if ema:
      return name + EMA_SUFFIX in used
    return name.endswith(EMA_SUFFIX) and name[: -len(EMA_SUFFIX)] in used

  variables, report = strict_fill.fill_report(
    abstract,
    rule,
    reader.get_tensor,
    names,
    skip,
    allow_missing=allow_missing,
    fallback=fallback,
  )
  return (variables, report) if with_report else variables


def official_names(
  variables: Mapping, backbone_name: str
) -> dict[tuple[str, ...], str]:
  """{our flattened path (collection first): official variable name}."""
  from flax import traverse_util

  bn = bn_modules(variables)
  return {
    p: official_name(p, backbone_name, p[1:-1] in bn)
    for p in traverse_util.flatten_dict(dict(variables))
  }


def to_official(
  variables: Mapping, backbone_name: str
) -> dict[str, np.ndarray]:
  """Our variables as {official name: array} (the inverse mapping)."""
  from flax import traverse_util

  flat = traverse_util.flatten_dict(dict(variables))
  names = official_names(variables, backbone_name)
  return {names[p]: np.asarray(v) for p, v in flat.items()}
