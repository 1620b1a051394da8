"""Stops a run whose loss explodes, before the exploded state is saved.

The step itself skips non-finite losses, gradients and updated states
(`train_step.py`); this catches the finite blow-up that precedes them: a
loss above `factor` times the median of the last `window` step losses. The
trainer checks every step's loss before each log line and before every
checkpoint save, so the newest checkpoint is always from before the first
bad step.
"""

from __future__ import annotations

import collections

import numpy as np

# Steps of history before the guard judges: one, since a blow-up at a high
# learning rate is often there by the second step, and every judged loss
# joins the history (a guard that waits would take the blow-up as normal).
MIN_HISTORY = 1


class TrainingDivergedError(FloatingPointError):
  """The loss left its running range (see the module docstring)."""


class DivergenceGuard:
  """`observe(step, loss)` for each step in order; raises on divergence."""

  def __init__(self, factor: float, window: int = 100):
    self.factor = float(factor)
    self.window = max(int(window), MIN_HISTORY)
    self._history: collections.deque[float] = collections.deque(
      maxlen=self.window
    )

  def observe(self, step: int, loss: float) -> None:
    loss = float(loss)
    if not np.isfinite(loss):
      return  # the step skipped it; the non-finite check reports it
    if self.factor > 0 and len(self._history) >= MIN_HISTORY:
      median = float(np.median(self._history))
      if loss > self.factor * max(median, 1e-12):
        raise TrainingDivergedError(
          f'training diverged at step {step}: loss {loss:.4g} is over '
          f'{self.factor:g}x the median {median:.4g} of the previous '
          f'{len(self._history)} steps. The newest checkpoint is from '
          'before it: lower train.learning_rate (or check the data), then '
          'resume; train.divergence_factor=0 turns this check off.'
        )
    self._history.append(loss)
