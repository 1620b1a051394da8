"""Device mesh and shardings, over the axes ('data', 'spatial').

The mesh comes from config `mesh.data` x `mesh.spatial` with one -1 filled
from the device count. The batch is sharded over 'data' (images also over
'spatial' along H, for the resolutions where one image's activations are
too big for one device); the train state is replicated unless a rule in
`mesh.param_rules` ((regex, PartitionSpec tuple) pairs) says otherwise.
Under jit, BatchNorm means over the batch axis are global-batch means: XLA
inserts the cross-device reductions.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ('data', 'spatial')


def mesh_shape(cfg: Any, num_devices: int) -> tuple[int, int]:
  """(data, spatial) with a single -1 filled in."""
  data, spatial = int(cfg.data), int(cfg.spatial)
  if data == -1 and spatial == -1:
    raise ValueError('only one of mesh.data / mesh.spatial may be -1')
  if data == -1:
    data = num_devices // spatial
  if spatial == -1:
    spatial = num_devices // data
  if data * spatial != num_devices:
    raise ValueError(
      f'mesh data={data} x spatial={spatial} != {num_devices} devices'
    )
  return data, spatial


def make_mesh(cfg: Any, devices: list | None = None) -> Mesh:
  """The ('data', 'spatial') mesh; explicit sizes may use fewer devices."""
  devices = jax.devices() if devices is None else list(devices)
  want = int(cfg.data) * int(cfg.spatial)
  if want > 0 and want < len(devices):
    logging.warning(
      'mesh %dx%d uses %d of %d devices',
      cfg.data,
      cfg.spatial,
      want,
      len(devices),
    )
    devices = devices[:want]
  shape = mesh_shape(cfg, len(devices))
  # Auto axes: GSPMD propagates shardings through the model (the step is
  # written for jit with in/out shardings, not sharding-in-types).
  auto = (AxisType.Auto,) * len(AXES)
  if devices == jax.devices():
    return jax.make_mesh(shape, AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def batch_shardings(mesh: Mesh, batch: dict) -> dict:
  """Per-key shardings: leading axis over 'data'; images' H over 'spatial';
  scalars (the step's learning rate) replicated."""

  def spec(key, x):
    if np.ndim(x) == 0:
      return NamedSharding(mesh, P())
    if key == 'image' and mesh.shape['spatial'] > 1:
      return NamedSharding(mesh, P('data', 'spatial'))
    return NamedSharding(mesh, P('data', *([None] * (np.ndim(x) - 1))))

  return {k: spec(k, v) for k, v in batch.items()}


def state_shardings(mesh: Mesh, abstract_state: Any, rules=()) -> Any:
  """Replicated, except leaves whose path matches a (regex, spec) rule."""
  replicated = NamedSharding(mesh, P())
  if not rules:
    return jax.tree.map(lambda _: replicated, abstract_state)
  compiled = [(re.compile(rx), P(*spec)) for rx, spec in rules]

  def pick(path, _):
    name = jax.tree_util.keystr(path)
    for rx, spec in compiled:
      if rx.search(name):
        return NamedSharding(mesh, spec)
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_state)


def wait_for_all_processes(name: str, timeout_s: float = 1800.0) -> None:
  """Returns when every process of a multi-process run has reached `name`.

  Called between a program's compile and its first run. The barrier is the
  coordination service's (the one `jax.distributed.initialize` started),
  with a long deadline: a collective cannot serve as the barrier, since
  on CPU the first one creates a gloo context whose rendezvous gives up
  after 30 s, less than the compile-time spread of processes that share
  cores. A no-op in a single process.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # noqa: PLC0415 - no public barrier

  client = distributed.global_state.client
  if client is None:  # processes not started by jax.distributed
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(name, int(timeout_s * 1000))
