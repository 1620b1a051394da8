"""Optimiser pieces with the official TF1 semantics.

Official: `efficientdet/det_model_fn.py: _model_fn` (optimizer, clipping,
EMA) and `reg_l2_loss`; the averaged variables are those of
`efficientdet/utils.py: get_ema_vars`.

* SGD momentum 0.9 as `tf.train.MomentumOptimizer`: a = m*a + g; w -= lr*a
  (`optax.trace` then scale by -lr).
* Weight decay `wd * sum(w**2) / 2` over kernels only (names ending in
  `kernel`: conv, depthwise and pointwise), added to the loss, so it passes
  through clipping like the official gradient.
* Clipping: each tensor to norm <= clip, then the whole tree by global norm.
* EMA of trainables **and** BN moving statistics (TF1), decay
  min(decay, (1 + n) / (10 + n)) with n the step count after the update
  (TF1 reads global_step after the optimizer incremented it).
* Freezing by a bool mask (the trainer builds it from `train.freeze` on
  official names, train/freeze.py): frozen leaves get no update, no weight
  decay and no part in clipping.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

PyTree = Any


def path_names(tree: PyTree) -> PyTree:
  """Same-structure tree of '/'-joined key paths."""
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict({k: '/'.join(k) for k in flat})


def mask_by_regex(tree: PyTree, pattern: str | None) -> PyTree:
  """Bool tree: True where the path matches `pattern` (re.search)."""
  if not pattern:
    return jax.tree.map(lambda _: False, tree)
  rx = re.compile(pattern)
  return jax.tree.map(lambda n: bool(rx.search(n)), path_names(tree))


def decay_mask(params: PyTree) -> PyTree:
  """True for kernels (conv/depthwise/pointwise), as `.*(kernel|weight)$`."""
  return jax.tree.map(
    lambda n: n.split('/')[-1].endswith('kernel'), path_names(params)
  )


def weight_decay_loss(params: PyTree, mask: PyTree, weight_decay: float):
  """wd * sum over masked leaves of ||w||^2 / 2 (`tf.nn.l2_loss`)."""
  terms = jax.tree.map(
    lambda w, m: jnp.sum(jnp.square(w.astype(jnp.float32))) if m else 0.0,
    params,
    mask,
  )
  return weight_decay * 0.5 * sum(jax.tree.leaves(terms))


def clip_per_tensor_then_global(
  max_norm: float,
) -> optax.GradientTransformation:
  """Official clipping: `clip_by_norm` per tensor, then by global norm."""

  def update(updates, state, params=None):
    del params

    def per_tensor(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g)))
      return g * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))

    updates = jax.tree.map(per_tensor, updates)
    norm = optax.global_norm(updates)
    scale = max_norm / jnp.maximum(norm, max_norm)
    return jax.tree.map(lambda g: g * scale, updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(
  momentum: float,
  clip_norm: float,
  frozen: PyTree | None = None,
) -> optax.GradientTransformation:
  """Clip -> momentum trace, frozen leaves' updates set to zero.

  The result is the TF1 accumulator `a`; the step applies `w -= lr(step) *
  a` itself, so the learning rate follows `TrainState.step` exactly (also
  across skipped steps and resumes).
  """
  parts = []
  if clip_norm and clip_norm > 0:
    parts.append(clip_per_tensor_then_global(clip_norm))
  parts.append(optax.trace(decay=momentum, nesterov=False))
  tx = optax.chain(*parts)
  if frozen is not None:
    labels = jax.tree.map(lambda f: 'frozen' if f else 'train', frozen)
    tx = optax.multi_transform(
      {'train': tx, 'frozen': optax.set_to_zero()}, labels
    )
  return tx


def host_initial_state(abstract_state: PyTree) -> PyTree:
  """`make_optimizer(...).init(params)` as NumPy arrays, from its abstract
  form (`jax.eval_shape(tx.init, params)`), with no program compiled: every
  part of that chain starts at zero (the momentum trace; the clipping and
  `set_to_zero` keep no state; `multi_transform`'s masked nodes have no
  leaves). tests/test_train_optimizer.py checks it against `tx.init`."""
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_state)


def ema_decay(step_after_update, decay: float):
  """min(decay, (1 + n) / (10 + n)) (tf.train.ExponentialMovingAverage)."""
  n = jnp.asarray(step_after_update, jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema: PyTree, new: PyTree, decay) -> PyTree:
  """ema <- decay * ema + (1 - decay) * new, leafwise."""
  return jax.tree.map(lambda e, v: e - (1.0 - decay) * (e - v), ema, new)
