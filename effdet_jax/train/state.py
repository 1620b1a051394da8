"""TrainState: everything a training step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """step, params, batch_stats, opt_state, their EMA, rng, skipped steps.

  `ema_params` / `ema_batch_stats` follow the official TF1 averaging of the
  trainables and the BN moving statistics; evaluation uses them by default.
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  ema_params: PyTree
  ema_batch_stats: PyTree
  rng: jax.Array
  num_skipped: jax.Array  # updates skipped for a non-finite loss/gradient
  last_skipped_step: jax.Array  # step of the last skipped update, -1: none

  def variables(self, ema: bool = True) -> dict:
    """Model variables ({'params', 'batch_stats'}), EMA or raw."""
    if ema:
      return {'params': self.ema_params, 'batch_stats': self.ema_batch_stats}
    return {'params': self.params, 'batch_stats': self.batch_stats}
