"""`train.freeze`: the official `var_freeze_expr`, on our parameter paths.

Official meaning (`efficientdet/efficientdet_arch.py: freeze_vars`; TF2
`efficientdet/tf2/train_lib.py: EfficientDetNetTrain._freeze_vars`):
`re.match` (anchored at the start) of the regex against each variable's
official name; matching variables leave the trainable list, so they get no
update and no L2 weight decay, and are left out of gradient clipping. The
official names are our paths with the backbone scope spelled
`efficientnet-bN` and BN leaves renamed
(`convert.tf_checkpoint.official_name`), so the official example
`(efficientnet|fpn_cells|resample_p6)` (`efficientdet/README.md`, section
"8. Finetune on PASCAL VOC 2012") freezes the backbone, the BiFPN and the
P6 resampling and trains the two heads. A pattern that matches nothing is an
error (the official code only warns).

Frozen parameters also get `stop_gradient` in the step, so no backward pass
runs through a frozen trunk (faster, and the same updates).

BN statistics: officially, frozen layers still normalise with the batch
statistics in training and keep updating their moving mean/variance. That
stays the default. `train.freeze_bn_stats=True` keeps the moving statistics
of the frozen layers (their official `moving_mean`/`moving_variance` names
match the regex) fixed; the layers that train keep updating theirs, since
those follow weights that change. The training forward pass still uses
batch statistics everywhere (as the official code does).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from effdet_jax.convert import tf_checkpoint

PyTree = Any


def masks(
  variables: PyTree, pattern: str, backbone_name: str
) -> tuple[PyTree, PyTree]:
  """(params mask, batch_stats mask): True where the official name matches.

  Args:
    variables: {'params', 'batch_stats'} or their shapes.
    pattern: the official `var_freeze_expr` ('' freezes nothing).
    backbone_name: the official backbone scope, e.g. 'efficientnet-b0'.

  Raises:
    ValueError: when a non-empty pattern matches no parameter.
  """
  names = tf_checkpoint.official_names(variables, backbone_name)
  rx = re.compile(pattern) if pattern else None
  flat = {p: bool(rx and rx.match(n)) for p, n in names.items()}
  if rx and not any(v for p, v in flat.items() if p[0] == 'params'):
    examples = sorted(n for p, n in names.items() if p[0] == 'params')[:3]
    raise ValueError(
      f'train.freeze={pattern!r} matches no parameter; it is matched (re.match)'
      f' against official names such as {examples}'
    )
  tree = traverse_util.unflatten_dict(flat)
  return tree['params'], tree.get('batch_stats', {})


def log_counts(params: PyTree, frozen: PyTree, pattern: str, stats: bool):
  """Logs how many parameters (values and tensors) are frozen / trainable."""
  sizes = jax.tree.leaves(jax.tree.map(lambda x: int(np.prod(x.shape)), params))
  flags = jax.tree.leaves(frozen)
  n_frozen = sum(s for s, f in zip(sizes, flags, strict=True) if f)
  t_frozen = sum(flags)
  msg = (
    'freeze %r: %d parameters frozen (%d tensors), %d trainable (%d tensors);'
    ' BN statistics of frozen layers %s'
  )
  logging.info(
    msg,
    pattern,
    n_frozen,
    t_frozen,
    sum(sizes) - n_frozen,
    len(flags) - t_frozen,
    'fixed' if stats else 'updated (official)',
  )
  return n_frozen, sum(sizes) - n_frozen
