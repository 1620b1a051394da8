"""The training state as the compiled step carries it: parameters,
momentum and both EMAs in flat vectors.

XLA:CPU compiles every fused loop of a program on its own, and an update
written leaf by leaf writes one buffer per leaf: momentum, weight and EMA for
each of D0's 493 parameters and the EMA of its 216 BN statistics, with the
per-leaf sums of squares for the clipping, made most of the step's kernels
and of its compile (`benchmarks/step_anatomy.py`). Here the parameters,
their momentum and their EMA are each one float32 vector (leaves in
`jax.tree.leaves` order, each starting on a `BLOCK` boundary) and the EMA
of the BN statistics another, updated by a few fused loops
(`train/update.py: apply_packed_update`). The model reads its parameters
as slices of the vector (`Layout.params_tree`); the BN statistics stay a
tree, which the model writes.

`TrainState` stays the state everything else sees: checkpoints (same
format), evaluation, `Trainer.step_fn`'s callers and `train_and_evaluate`'s
result. `Layout.pack` and `Layout.unpack` convert on the host (slices and
concatenations of NumPy arrays, no compiled program), at the training
loop's start, saves, evaluations and end. Packing needs replicated state
leaves, which `runtime/partitioning.py: state_shardings` gives (data and
spatial parallelism replicate the state).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from effdet_jax.train.state import TrainState

PyTree = Any


@flax.struct.dataclass
class PackedState:
  """`TrainState` with `params`, `trace` (the momentum accumulators),
  `ema_params` and `ema_batch_stats` as flat float32 vectors; `batch_stats`
  stays a tree. The parameter vectors share one padded layout
  (`Layout.param_slices`): each leaf starts on a `BLOCK` boundary, the
  padding is zero, and a frozen parameter's momentum stays zero."""

  step: jax.Array
  params: jax.Array
  batch_stats: PyTree
  trace: jax.Array
  ema_params: jax.Array
  ema_batch_stats: jax.Array
  rng: jax.Array
  num_skipped: jax.Array
  last_skipped_step: jax.Array


# Leaves start on multiples of BLOCK elements, so that the per-leaf sums of
# squares are one reduction over [blocks, BLOCK] and a segment sum over the
# blocks (`train/update.py: apply_packed_update`); padding is < 1 % for D0.
BLOCK = 128


def _key(path) -> str:
  return jax.tree_util.keystr(path)


def _trace_keys(opt_state: PyTree) -> list[str]:
  """The params path of each `optax.TraceState` accumulator, in the order
  of `jax.tree.leaves(opt_state)`."""
  keys = []
  nodes = jax.tree.leaves(
    opt_state, is_leaf=lambda n: isinstance(n, optax.TraceState)
  )
  for node in nodes:
    if isinstance(node, optax.TraceState):
      flat = jax.tree_util.tree_flatten_with_path(node.trace)[0]
      keys.extend(_key(path) for path, _ in flat)
    elif jax.tree.leaves(node):
      raise ValueError(
        f'cannot pack an optimizer state with a {type(node).__name__} '
        'holding arrays (only optax.trace accumulators are packed)'
      )
  return keys


def _offsets(shapes: list[tuple], block: int = 1) -> list[tuple[int, int]]:
  """(start, stop) of each leaf, starts on multiples of `block`."""
  out, at = [], 0
  for shape in shapes:
    n = int(np.prod(shape, dtype=np.int64))
    out.append((at, at + n))
    at += -(-n // block) * block
  return out


def _host(x: Any) -> np.ndarray:
  """A (replicated) array's value on this host."""
  if isinstance(x, jax.Array):
    if not x.sharding.is_fully_replicated:
      raise ValueError('packing needs replicated state leaves')
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


class Layout:
  """Where each leaf sits in the flat buffers, from the abstract state."""

  def __init__(self, abstract_state: TrainState):
    a = abstract_state
    for x in jax.tree.leaves(
      (a.params, a.batch_stats, a.opt_state, a.ema_params, a.ema_batch_stats)
    ):
      if x.dtype != jnp.float32:
        raise ValueError(f'packing needs float32 state leaves, not {x.dtype}')
    flat_params, self.params_def = jax.tree_util.tree_flatten_with_path(
      a.params
    )
    keys = [_key(p) for p, _ in flat_params]
    self.param_shapes = [tuple(x.shape) for _, x in flat_params]
    self.block = BLOCK
    self.param_slices = _offsets(self.param_shapes, BLOCK)
    ends = [-(-hi // BLOCK) * BLOCK for _, hi in self.param_slices]
    self.params_size = ends[-1] if ends else 0
    # The leaf of each BLOCK-element block of a parameter vector.
    self.block_leaf = np.concatenate(
      [
        np.full(((end - lo) // BLOCK,), i, np.int32)
        for i, ((lo, _), end) in enumerate(
          zip(self.param_slices, ends, strict=True)
        )
      ]
      or [np.zeros((0,), np.int32)]
    )
    stats = jax.tree.leaves(a.batch_stats)
    self.stats_def = jax.tree.structure(a.batch_stats)
    self.stats_shapes = [tuple(x.shape) for x in stats]
    self.stats_slices = _offsets(self.stats_shapes)
    self.stats_size = self.stats_slices[-1][1] if stats else 0
    self.opt_def = jax.tree.structure(a.opt_state)
    trace_keys = _trace_keys(a.opt_state)
    if len(jax.tree.leaves(a.opt_state)) != len(trace_keys):
      raise ValueError('the optimizer state holds arrays other than traces')
    index = {k: i for i, k in enumerate(keys)}
    unknown = [k for k in trace_keys if k not in index]
    if unknown:
      raise ValueError(f'accumulators without a parameter: {unknown[:3]}')
    # Param leaf of each accumulator, in the optimizer state's order.
    self.trace_params = [index[k] for k in trace_keys]

  def abstract(self, abstract_state: TrainState) -> PackedState:
    """The packed state's ShapeDtypeStructs."""
    vec = lambda n: jax.ShapeDtypeStruct((n,), jnp.float32)  # noqa: E731
    a = abstract_state
    return PackedState(
      step=a.step,
      params=vec(self.params_size),
      batch_stats=a.batch_stats,
      trace=vec(self.params_size),
      ema_params=vec(self.params_size),
      ema_batch_stats=vec(self.stats_size),
      rng=a.rng,
      num_skipped=a.num_skipped,
      last_skipped_step=a.last_skipped_step,
    )

  def shardings(self, state_shardings: TrainState) -> PackedState:
    """The packed state's shardings: the vectors replicated (as every
    state leaf is), the other leaves as in `state_shardings`."""
    s = state_shardings
    replicated = jax.tree.leaves(s.params)[0]
    return PackedState(
      step=s.step,
      params=replicated,
      batch_stats=s.batch_stats,
      trace=replicated,
      ema_params=replicated,
      ema_batch_stats=replicated,
      rng=s.rng,
      num_skipped=s.num_skipped,
      last_skipped_step=s.last_skipped_step,
    )

  # In the compiled step.

  def params_tree(self, vector: jax.Array) -> PyTree:
    """The parameter tree of a parameter vector (slices)."""
    return jax.tree.unflatten(
      self.params_def,
      [
        vector[lo:hi].reshape(shape)
        for (lo, hi), shape in zip(
          self.param_slices, self.param_shapes, strict=True
        )
      ],
    )

  def params_vector(self, tree: PyTree) -> jax.Array:
    """A parameter-shaped tree as one padded vector (zero padding)."""
    parts = []
    for x, (_, hi) in zip(
      jax.tree.leaves(tree), self.param_slices, strict=True
    ):
      parts.append(x.astype(jnp.float32).reshape(-1))
      pad = -(-hi // BLOCK) * BLOCK - hi
      if pad:
        parts.append(jnp.zeros((pad,), jnp.float32))
    return jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)

  # On the host.

  def _vector(self, leaves, slices, size, sharding):
    value = np.zeros((size,), np.float32)
    for x, (lo, hi) in zip(leaves, slices, strict=True):
      value[lo:hi] = _host(x).reshape(-1)
    return jax.make_array_from_callback(
      value.shape, sharding, lambda index: value[index]
    )

  def _leaves(self, vector, slices, shapes, shardings):
    value = _host(vector)
    out = []
    for (lo, hi), shape, sharding in zip(
      slices, shapes, shardings, strict=True
    ):
      part = value[lo:hi].reshape(shape)
      out.append(
        jax.make_array_from_callback(shape, sharding, lambda i, p=part: p[i])
      )
    return out

  def pack(self, state: TrainState, shardings: PackedState) -> PackedState:
    """`state` packed; host copies, each vector created in its sharding."""
    p, s = self.param_slices, self.params_size
    trace_slices = [p[i] for i in self.trace_params]
    return PackedState(
      step=state.step,
      params=self._vector(
        jax.tree.leaves(state.params), p, s, shardings.params
      ),
      batch_stats=state.batch_stats,
      trace=self._vector(
        jax.tree.leaves(state.opt_state), trace_slices, s, shardings.trace
      ),
      ema_params=self._vector(
        jax.tree.leaves(state.ema_params), p, s, shardings.ema_params
      ),
      ema_batch_stats=self._vector(
        jax.tree.leaves(state.ema_batch_stats),
        self.stats_slices,
        self.stats_size,
        shardings.ema_batch_stats,
      ),
      rng=state.rng,
      num_skipped=state.num_skipped,
      last_skipped_step=state.last_skipped_step,
    )

  def unpack(
    self, packed: PackedState, state_shardings: TrainState
  ) -> TrainState:
    """The `TrainState` of `packed`: the vectors sliced on the host into
    leaves, each created in its sharding."""
    s = state_shardings
    p, shapes = self.param_slices, self.param_shapes

    def tree(vector, shardings):
      return jax.tree.unflatten(
        self.params_def,
        self._leaves(vector, p, shapes, jax.tree.leaves(shardings)),
      )

    return TrainState(
      step=packed.step,
      params=tree(packed.params, s.params),
      batch_stats=packed.batch_stats,
      opt_state=jax.tree.unflatten(
        self.opt_def,
        self._leaves(
          packed.trace,
          [p[i] for i in self.trace_params],
          [shapes[i] for i in self.trace_params],
          jax.tree.leaves(s.opt_state),
        ),
      ),
      ema_params=tree(packed.ema_params, s.ema_params),
      ema_batch_stats=jax.tree.unflatten(
        self.stats_def,
        self._leaves(
          packed.ema_batch_stats,
          self.stats_slices,
          self.stats_shapes,
          jax.tree.leaves(s.ema_batch_stats),
        ),
      ),
      rng=packed.rng,
      num_skipped=packed.num_skipped,
      last_skipped_step=packed.last_skipped_step,
    )
