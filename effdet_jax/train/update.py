"""The step's update: clipping, SGD momentum, EMA and the non-finite guard,
written for a short compile.

The mathematics is `train/optimizer.py` (the official TF1 semantics of
`efficientdet/det_model_fn.py: _model_fn`): each gradient clipped to norm
`clip_norm`, then the whole tree by global norm; `a = momentum * a + g`;
`w -= lr * a`; EMA of the weights and the BN statistics. What this module
changes is only the program's shape, because XLA compiles (and loads from
its cache) each fused loop on its own and a D0 state has ~500 parameter
and ~200 statistic leaves:

* One sum of squares per gradient leaf, stacked into a vector: the
  per-tensor norms, the global norm of the clipped tree (sum of
  `c_i^2 * s_i`, no second pass over the gradients), the reported gradient
  norm and the finiteness test all come from it.
* The update runs under `lax.cond` on the finiteness test. A select per
  state leaf (`where(ok, new, old)`) instead makes every leaf's fused loop
  take the test as input, and XLA duplicates the scalar chain behind it
  into each of them: a compile quadratic in the number of leaves.

The state after a skipped step is the state before it, with `step`,
`num_skipped` and `last_skipped_step` advanced. The guard tests the loss,
the gradients and the new BN statistics (an overflowing batch variance
normalises to a finite loss). It does not reduce over the new weights: with
clipped gradients an update moves a weight by at most
`lr * clip_norm / (1 - momentum)`, which cannot overflow float32 from a
finite state; a state that is not finite is refused by the checkpointer
(`runtime/checkpoint.py`) and stops the next step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from effdet_jax.train import optimizer
from effdet_jax.train.state import TrainState

PyTree = Any


def _sumsq(x: jax.Array) -> jax.Array:
  # Written as a dot; XLA's simplifier lowers it to the same reduction as
  # `sum(square(x))` (one per leaf either way).
  flat = x.astype(jnp.float32).reshape(-1)
  return jnp.dot(flat, flat, precision=jax.lax.Precision.HIGHEST)


def clip_factors(sumsq: jax.Array, clip_norm: float) -> jax.Array:
  """Per-leaf factors of the official clipping, from per-leaf sums of
  squares: `clip_by_norm` per tensor, then by global norm."""
  if not clip_norm or clip_norm <= 0:
    return jnp.ones_like(sumsq)
  per = jnp.minimum(1.0, clip_norm / jnp.maximum(jnp.sqrt(sumsq), 1e-12))
  clipped = jnp.sqrt(jnp.sum(per * per * sumsq))
  return per * (clip_norm / jnp.maximum(clipped, clip_norm))


def _key(path) -> str:
  return jax.tree_util.keystr(path)


def _replace_trace(opt_state: PyTree, new_trace: dict[str, jax.Array]) -> Any:
  """`opt_state` with each `optax.TraceState`'s accumulators replaced by
  `new_trace[path]` (paths as in the params tree), structure unchanged:
  checkpoints of `optimizer.make_optimizer`'s state stay readable."""

  def swap(node):
    if not isinstance(node, optax.TraceState):
      return node
    return node._replace(
      trace=jax.tree_util.tree_map_with_path(
        lambda p, _: new_trace[_key(p)], node.trace
      )
    )

  return jax.tree.map(
    swap, opt_state, is_leaf=lambda n: isinstance(n, optax.TraceState)
  )


def _traces(opt_state: PyTree) -> dict[str, jax.Array]:
  """{params path: accumulator} from the state's `optax.TraceState`."""
  out = {}
  nodes = jax.tree.leaves(
    opt_state, is_leaf=lambda n: isinstance(n, optax.TraceState)
  )
  for node in nodes:
    if isinstance(node, optax.TraceState):
      for path, leaf in jax.tree_util.tree_flatten_with_path(node.trace)[0]:
        out[_key(path)] = leaf
  return out


def _stats_and_ok(loss, total, new_batch_stats):
  """(the new BN statistics as one float32 vector, whether the loss, the
  gradients' sum of squares `total` and the statistics are all finite):
  one concatenation and one dot for all statistics (they are small)."""
  stats = [
    x.astype(jnp.float32).reshape(-1) for x in jax.tree.leaves(new_batch_stats)
  ]
  stats = jnp.concatenate(stats) if stats else jnp.zeros((0,))
  stats_total = jnp.dot(stats, jnp.ones_like(stats))
  ok = jnp.isfinite(loss) & jnp.isfinite(total) & jnp.isfinite(stats_total)
  return stats, ok


def _skipped_state(state, step):
  """`state` after a skipped update: only the step and skip counters move."""
  return state.replace(
    step=step,
    num_skipped=state.num_skipped + 1,
    last_skipped_step=state.step,
  )


def apply_update(
  state: TrainState,
  grads: PyTree,
  new_batch_stats: PyTree,
  loss: jax.Array,
  lr: jax.Array,
  *,
  momentum: float,
  clip_norm: float,
  ema_decay: float,
  frozen: PyTree | None = None,
) -> tuple[TrainState, jax.Array, jax.Array]:
  """One optimizer + EMA update, skipped when not finite.

  Returns `(new_state, grad_norm, ok)`: `grad_norm` is the global norm of
  the unclipped gradients, `ok` whether the update was applied.
  """
  paths_grads, treedef = jax.tree_util.tree_flatten_with_path(grads)
  keys = [_key(p) for p, _ in paths_grads]
  grad_leaves = [g for _, g in paths_grads]
  frozen_leaves = (
    jax.tree.leaves(frozen) if frozen is not None else [False] * len(keys)
  )
  train_idx = [i for i, f in enumerate(frozen_leaves) if not f]
  sumsq = jnp.stack(
    [_sumsq(grad_leaves[i]) for i in train_idx] or [jnp.zeros(())]
  )
  total = jnp.sum(sumsq)
  factors = clip_factors(sumsq, clip_norm)
  _, ok = _stats_and_ok(loss, total, new_batch_stats)
  step = state.step + 1

  def applied(operands):
    st, grad_leaves, factors, lr, new_bs = operands
    traces = _traces(st.opt_state)
    params = jax.tree.leaves(st.params)
    new_params = list(params)
    new_trace = {}
    for j, i in enumerate(train_idx):
      a = momentum * traces[keys[i]] + factors[j] * grad_leaves[i]
      new_trace[keys[i]] = a
      new_params[i] = params[i] - lr.astype(params[i].dtype) * a
    new_params = jax.tree.unflatten(treedef, new_params)
    decay = optimizer.ema_decay(step, ema_decay)
    return st.replace(
      step=step,
      params=new_params,
      batch_stats=new_bs,
      opt_state=_replace_trace(st.opt_state, new_trace),
      ema_params=optimizer.ema_update(st.ema_params, new_params, decay),
      ema_batch_stats=optimizer.ema_update(st.ema_batch_stats, new_bs, decay),
    )

  def skipped(operands):
    return _skipped_state(operands[0], step)

  new_state = jax.lax.cond(
    ok, applied, skipped, (state, grad_leaves, factors, lr, new_batch_stats)
  )
  return new_state, jnp.sqrt(total), ok


def apply_packed_update(
  state: Any,
  layout: Any,
  grads: PyTree,
  new_batch_stats: PyTree,
  loss: jax.Array,
  lr: jax.Array,
  *,
  momentum: float,
  clip_norm: float,
  ema_decay: float,
) -> tuple[Any, jax.Array, jax.Array]:
  """`apply_update` on a `train/packed.py: PackedState`: the same
  formulas, element for element, on whole vectors.

  The gradients are written into one padded vector; its per-leaf sums of
  squares are a reduction over `[blocks, BLOCK]` and a segment sum over
  the blocks (a different summation order from `apply_update`'s: results
  agree to float32 rounding). A frozen parameter's gradient is zero
  (`stop_gradient` in the step), so its momentum stays zero and its value
  unchanged, as `apply_update` leaves it.
  """
  n_leaves = len(layout.param_shapes)
  g = None
  if layout.params_size:
    g = layout.params_vector(grads).reshape(-1, layout.block)
    sumsq = jax.ops.segment_sum(
      jnp.sum(g * g, axis=1),
      jnp.asarray(layout.block_leaf),
      num_segments=n_leaves,
      indices_are_sorted=True,
    )
  else:
    sumsq = jnp.zeros((1,))
  total = jnp.sum(sumsq)
  factors = clip_factors(sumsq, clip_norm)
  stats, ok = _stats_and_ok(loss, total, new_batch_stats)
  step = state.step + 1

  def applied(operands):
    st, g, factors, lr, new_bs, stats = operands
    decay = optimizer.ema_decay(step, ema_decay)
    ema = lambda e, v: e - (1.0 - decay) * (e - v)  # noqa: E731 - ema_update
    if g is None:  # no parameters
      return st.replace(
        step=step,
        batch_stats=new_bs,
        ema_batch_stats=ema(st.ema_batch_stats, stats),
      )
    clipped = (g * factors[jnp.asarray(layout.block_leaf)][:, None]).reshape(-1)
    trace = momentum * st.trace + clipped
    params = st.params - lr * trace
    return st.replace(
      step=step,
      params=params,
      batch_stats=new_bs,
      trace=trace,
      ema_params=ema(st.ema_params, params),
      ema_batch_stats=ema(st.ema_batch_stats, stats),
    )

  def skipped(operands):
    return _skipped_state(operands[0], step)

  new_state = jax.lax.cond(
    ok, applied, skipped, (state, g, factors, lr, new_batch_stats, stats)
  )
  return new_state, jnp.sqrt(total), ok
