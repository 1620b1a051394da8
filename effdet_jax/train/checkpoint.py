"""Moved to `effdet_jax.runtime.checkpoint` (evaluation and
`effdet_jax.load` read checkpoints too); this alias will be removed."""

import warnings

from effdet_jax.files import absolute
from effdet_jax.runtime.checkpoint import (
  CHECKPOINT_DIR,
  Checkpointer,
  restore_variables,
)

__all__ = ['CHECKPOINT_DIR', 'Checkpointer', 'absolute', 'restore_variables']

warnings.warn(
  'effdet_jax.train.checkpoint moved to effdet_jax.runtime.checkpoint',
  DeprecationWarning,
  stacklevel=2,
)
