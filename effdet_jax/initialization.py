"""Fresh variables drawn on the host and placed in their shardings.

`model.init` under `jax.jit` is a program of ~700 random expansions for a
D0, each its own fused kernel: XLA:CPU compiles it in 12-20 s and a GPU in
most of a minute, before the first step of every fresh run. Here the model
is traced once abstractly (`jax.eval_shape`, no compile) while
`effdet_jax.models.initializers` records which initialiser made each
variable; the values are then drawn with NumPy, leaf by leaf, and each
becomes a global array in its sharding (`jax.make_array_from_callback`),
so every device receives only its shard and every host draws the same
values from the same seed.

Each leaf's generator is seeded by (seed, crc32 of the leaf's path): a
leaf's value does not depend on which other leaves exist. A variable made
by any other initialiser (e.g. a block a user added with a stock Flax
initialiser) is computed by one small compiled program of only those
leaves, with a warning naming them.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effdet_jax.models import initializers

PyTree = Any


def _example_images(model: Any) -> jax.Array:
  size = 2**model.max_level  # the smallest input every level accepts
  return jnp.zeros((1, size, size, 3), jnp.float32)


def init(model: Any, key: jax.Array) -> dict:
  return model.init(key, _example_images(model), train=False)


def abstract_variables(model: Any) -> dict:
  """The variables' shapes and dtypes (`jax.ShapeDtypeStruct`s), no values."""
  return jax.eval_shape(lambda k: init(model, k), jax.random.PRNGKey(0))


def seed_words(rng: Any) -> list[int]:
  """A NumPy seed from a JAX key (raw uint32 or typed) or an int."""
  if isinstance(rng, int):
    return [rng & 0xFFFFFFFF, rng >> 32]
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return [int(w) for w in np.asarray(rng, np.uint32).ravel()]


def trace(model: Any) -> tuple[dict, dict]:
  """(abstract variables, {flat path: the initialiser that made it, or
  None}): one abstract trace of `model.init`, nothing computed."""
  made: dict = {}
  if getattr(model, 'remat', False):
    # Lifted transforms (nn.remat) hand back new values, not the recorded
    # ones; gradient checkpointing does not change the variables.
    model = model.clone(remat=False)

  def traced(key):
    with initializers.recording() as records:
      variables = init(model, key)
    by_value = {id(value): init for value, init in records}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
      made[path] = by_value.get(id(leaf))
    return variables

  abstract = jax.eval_shape(traced, jax.random.PRNGKey(0))
  return abstract, made


def host_variables(
  model: Any, rng: Any = 0, traced: tuple[dict, dict] | None = None
) -> dict:
  """Fresh variables ({'params', 'batch_stats'}) as NumPy arrays.

  The same distributions as `model.init` (its initialisers' NumPy forms),
  not the same numbers. `traced`: `trace(model)` when already at hand.
  """
  abstract, made = traced or trace(model)
  seed = seed_words(rng)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  values, others = [], []
  for path, leaf in flat:
    init = made[path]
    if init is None:
      values.append(None)
      others.append(path)
      continue
    name = jax.tree_util.keystr(path)
    gen = np.random.default_rng([*seed, zlib.crc32(name.encode())])
    values.append(init.numpy(gen, leaf.shape, np.dtype(leaf.dtype)))
  if others:
    _fill_compiled(model, rng, flat, values, others)
  return jax.tree.unflatten(treedef, values)


def _fill_compiled(
  model: Any, rng: Any, flat: list, values: list, others: list
) -> None:
  """The leaves no recorded initialiser made, from `model.init` compiled
  with only them as outputs (XLA drops every other initialiser)."""
  names = [jax.tree_util.keystr(p) for p in others]
  logging.warning(
    'initialising %d variable(s) with a compiled model.init (their '
    'initialisers are not from effdet_jax.models.initializers): %s',
    len(names),
    ', '.join(names[:5]) + (' ...' if len(names) > 5 else ''),
  )
  wanted = set(others)
  key = rng if not isinstance(rng, int) else jax.random.PRNGKey(rng)

  def pick(k):
    leaves = jax.tree_util.tree_flatten_with_path(init(model, k))[0]
    return [leaf for path, leaf in leaves if path in wanted]

  got = iter(jax.device_get(jax.jit(pick)(key)))
  for i, (path, _) in enumerate(flat):
    if path in wanted:
      values[i] = np.asarray(next(got))


def to_device(tree: PyTree, shardings: PyTree | None = None) -> PyTree:
  """Host arrays as global `jax.Array`s, each created in its sharding
  (only the shards a device holds are copied to it); None: the default
  device."""
  if shardings is None:
    return jax.tree.map(jnp.asarray, tree)

  def put(value, sharding):
    value = np.asarray(value)
    return jax.make_array_from_callback(
      value.shape, sharding, lambda index: value[index]
    )

  return jax.tree.map(put, tree, shardings)
