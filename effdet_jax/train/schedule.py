"""Learning-rate schedules with the official TF1 semantics.

Official: `efficientdet/det_model_fn.py: learning_rate_schedule` (and its
`cosine_lr_schedule`, `stepwise_lr_schedule`, `polynomial_lr_schedule`),
parameters from `update_learning_rate_schedule_parameters`:

* adjusted_lr = learning_rate * global_batch / 64, and (TF1) the warmup
  start is scaled the same way;
* warmup (step < warmup_steps): linear from warmup_init to adjusted_lr;
* cosine: 0.5 * lr * (1 + cos(pi * step / (total - warmup))) on the **raw**
  step (it reaches 0 at total - warmup and rises slightly after);
* stepwise: x0.1 from the first drop step, x0.01 from the second;
* polynomial: lr * (1 - step / total) ** power;
* constant: lr after warmup.
Durations are given in steps here; `steps_from_config` turns epochs into
steps once the global batch is known, at run time, and is the only place
that does, so no two durations can disagree about the steps per epoch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax.numpy as jnp

DECAY_METHODS = ('cosine', 'stepwise', 'polynomial', 'constant')


@dataclasses.dataclass(frozen=True)
class ScheduleSteps:
  warmup: int
  total: int
  first_drop: int
  second_drop: int


def steps_from_config(
  train: Any, num_examples: int | None = None
) -> ScheduleSteps:
  """Warmup/total/drop steps from epochs (or `train.num_steps` when > 0)."""
  batch = train.batch_size
  examples = num_examples or train.num_examples_per_epoch
  per_epoch = examples / batch  # TF1: float division
  total = (
    int(train.num_steps)
    if train.num_steps > 0
    else int(train.num_epochs * per_epoch)
  )
  return ScheduleSteps(
    warmup=int(train.lr_warmup_epoch * per_epoch)
    if train.lr_warmup_steps < 0
    else int(train.lr_warmup_steps),
    total=total,
    first_drop=int(train.first_lr_drop_epoch * per_epoch),
    second_drop=int(train.second_lr_drop_epoch * per_epoch),
  )


def learning_rate_fn(
  train: Any, steps: ScheduleSteps, xp: Any = jnp
) -> Callable[[Any], Any]:
  """step -> learning rate, TF1 official semantics; jit-able with `xp`
  jax.numpy, a host float32 with `xp` numpy (the trainer feeds the step its
  learning rate, so one compiled step serves every schedule)."""
  scale = train.batch_size / 64.0
  lr = train.learning_rate * scale
  warm_init = train.lr_warmup_init * scale
  method = train.lr_decay_method
  if method not in DECAY_METHODS:
    raise ValueError(f'unknown lr_decay_method {method!r}: {DECAY_METHODS}')
  warmup = max(steps.warmup, 0)

  def fn(step):
    step = xp.asarray(step, xp.float32)
    if method == 'cosine':
      denom = max(steps.total - warmup, 1)
      decayed = 0.5 * lr * (1 + xp.cos(math.pi * step / denom))
    elif method == 'stepwise':
      decayed = xp.where(
        step < steps.first_drop,
        lr,
        xp.where(step < steps.second_drop, lr * 0.1, lr * 0.01),
      )
    elif method == 'polynomial':
      frac = xp.clip(1.0 - step / max(steps.total, 1), 0.0, 1.0)
      decayed = lr * frac**train.poly_lr_power
    else:
      decayed = xp.full_like(step, lr)
    if warmup == 0:
      return xp.asarray(decayed, xp.float32)
    warm = warm_init + step / warmup * (lr - warm_init)
    return xp.asarray(xp.where(step < warmup, warm, decayed), xp.float32)

  return fn
