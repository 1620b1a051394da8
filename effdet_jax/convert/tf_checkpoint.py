"""Official google/automl name-based TF checkpoints -> our variables.

Names are the official scopes (fact sheet §11.1) with our `backbone` prefix
replaced by the backbone name and BN leaves renamed; kernels already have the
TF layouts we keep. EMA shadows (`<name>/ExponentialMovingAverage`) are used
by default, as the official evaluation and inference do (§11.3).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

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


def _bn_modules(abstract: Mapping) -> set[tuple[str, ...]]:
  from flax import traverse_util

  return {
    p[1:-1]
    for p in traverse_util.flatten_dict(dict(abstract))
    if p[0] == 'params' and p[-1] == 'scale'
  }


def convert_tf_checkpoint(
  ckpt_path: str, abstract: Mapping, backbone_name: str, ema: bool = True
) -> dict:
  """Reads an official checkpoint into a tree shaped like `abstract`.

  Args:
    ckpt_path: checkpoint folder or prefix (as `tf.train.load_checkpoint`).
    abstract: our variables or `jax.eval_shape` of them.
    backbone_name: e.g. 'efficientnet-b0' (the checkpoint's backbone scope).
    ema: read the `/ExponentialMovingAverage` shadows (True) or the raw
      weights (False). With ema=True a variable without a shadow is an error.
  """
  import tensorflow as tf

  reader = tf.train.load_checkpoint(ckpt_path)
  names = set(reader.get_variable_to_shape_map())
  bn = _bn_modules(abstract)
  has_ema = any(n.endswith(EMA_SUFFIX) for n in names)
  if ema and not has_ema:
    raise strict_fill.ConversionError(
      f'{ckpt_path} has no {EMA_SUFFIX} shadows; convert with --ema=false'
    )

  def rule(path):
    name = official_name(path, backbone_name, path[1:-1] in bn)
    return (name + EMA_SUFFIX if ema else name), lambda a: a

  def ignore(name: str, used: set[str]) -> bool:
    # The copy we did not read is fine to skip only where we read its twin.
    if re.fullmatch(_NOT_WEIGHTS, name):
      return True
    if ema:
      return name + EMA_SUFFIX in used
    return name.endswith(EMA_SUFFIX) and name[: -len(EMA_SUFFIX)] in used

  return strict_fill.fill(abstract, rule, reader.get_tensor, names, ignore)


def to_official(
  variables: Mapping, backbone_name: str
) -> dict[str, np.ndarray]:
  """Our variables as {official name: array} (the inverse mapping)."""
  from flax import traverse_util

  bn = _bn_modules(variables)
  return {
    official_name(p, backbone_name, p[1:-1] in bn): np.asarray(v)
    for p, v in traverse_util.flatten_dict(dict(variables)).items()
  }
