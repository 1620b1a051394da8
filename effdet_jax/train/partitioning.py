"""Moved to `effdet_jax.runtime.partitioning` (evaluation shards its
batches too); this alias will be removed."""

import warnings

from effdet_jax.runtime.partitioning import (
  AXES,
  batch_shardings,
  make_mesh,
  mesh_shape,
  state_shardings,
)

__all__ = [
  'AXES',
  'batch_shardings',
  'make_mesh',
  'mesh_shape',
  'state_shardings',
]

warnings.warn(
  'effdet_jax.train.partitioning moved to effdet_jax.runtime.partitioning',
  DeprecationWarning,
  stacklevel=2,
)
