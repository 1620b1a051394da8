"""Moved to `effdet_jax.runtime.metrics` (evaluation writes metrics
too); this alias will be removed."""

import warnings

from effdet_jax.runtime.metrics import (
  METRICS_FILE,
  JsonlWriter,
  create_writer,
  read_metrics,
)

__all__ = ['METRICS_FILE', 'JsonlWriter', 'create_writer', 'read_metrics']

warnings.warn(
  'effdet_jax.train.metrics moved to effdet_jax.runtime.metrics',
  DeprecationWarning,
  stacklevel=2,
)
