"""The jitted training step: forward -> targets -> loss -> update -> EMA.

One pure function of (state, batch); shardings are applied by the caller's
`jax.jit`. BN statistics are means over the (global) batch axis. A step
whose loss, gradients or new BN statistics are not finite leaves the state
unchanged except for `step`, `num_skipped` and `last_skipped_step` (the
trainer then stops with an error, or counts it with
`train.skip_nonfinite`); the update itself is `train/update.py`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from effdet_jax.detection import losses, targets
from effdet_jax.train import optimizer, update
from effdet_jax.train.state import TrainState


def make_train_step(
  model: Any,
  config: Any,
  anchors: Any,
  lr_fn: Callable[[Any], Any],
  wd_mask: Any,
  frozen: Any = None,
  frozen_stats: Any = None,
  layout: Any = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Builds `train_step(state, batch) -> (state, metrics)`.

  With `layout` (`train/packed.py: Layout`) the step takes and returns a
  `PackedState` (the trainer's form: a much shorter compile), else a
  `TrainState`; both compute the same numbers.

  `frozen` (bool tree like params, `train.freeze`): those parameters get
  `stop_gradient`, so no backward pass runs through a frozen trunk (their
  update is zero anyway: `train/update.py` skips them). `frozen_stats`
  (bool tree like batch_stats, `train.freeze_bn_stats`): those moving
  statistics keep their values.
  """
  t = config.train
  loss_kw = losses.loss_kwargs(config)
  anchors = jnp.asarray(anchors, jnp.float32)

  def loss_fn(params, batch_stats, batch, rng):
    if frozen is not None:
      params = jax.tree.map(
        lambda w, f: jax.lax.stop_gradient(w) if f else w, params, frozen
      )
    variables = {'params': params, 'batch_stats': batch_stats}
    (cls, box), new_vars = model.apply(
      variables,
      batch['image'],
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': rng},
    )
    tg = targets.assign(
      anchors,
      batch['boxes'],
      batch['classes'],
      t.matched_threshold,
      t.unmatched_threshold,
    )
    det_loss, parts = losses.detection_loss(
      cls, box, tg, anchors=anchors, **loss_kw
    )
    wd = optimizer.weight_decay_loss(params, wd_mask, t.weight_decay)
    parts = dict(parts, weight_decay=wd, det_loss=det_loss)
    return det_loss + wd, (parts, new_vars['batch_stats'])

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    # The packed state holds the parameters as one vector: the model reads
    # its slices, and the gradients are taken with respect to them.
    params = (
      state.params if layout is None else layout.params_tree(state.params)
    )
    (loss, (parts, new_bs)), grads = grad_fn(
      params, state.batch_stats, batch, rng
    )
    if frozen_stats is not None:
      new_bs = jax.tree.map(
        lambda old, new, f: old if f else new,
        state.batch_stats,
        new_bs,
        frozen_stats,
      )
    # The trainer feeds the learning rate (`batch['learning_rate']`, its
    # host schedule): the compiled step then holds no schedule constant and
    # serves any num_steps, warmup or learning rate (a resume that changes
    # them reuses the compilation cache).
    lr = batch.get('learning_rate')
    if lr is None:
      lr = lr_fn(state.step)
    hyper = dict(
      momentum=t.momentum,
      clip_norm=t.clip_gradients_norm,
      ema_decay=t.moving_average_decay,
    )
    lr = jnp.asarray(lr, jnp.float32)
    if layout is not None:
      new_state, grad_norm, ok = update.apply_packed_update(
        state, layout, grads, new_bs, loss, lr, **hyper
      )
    else:
      new_state, grad_norm, ok = update.apply_update(
        state, grads, new_bs, loss, lr, frozen=frozen, **hyper
      )
    metrics = dict(
      parts,
      loss=loss,
      grad_norm=grad_norm,
      learning_rate=lr,
      nonfinite=(~ok).astype(jnp.int32),
    )
    return new_state, metrics

  return train_step
