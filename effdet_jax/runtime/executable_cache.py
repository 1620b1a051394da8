"""Compiled programs stored under a key known before tracing.

JAX's persistent compilation cache is keyed by the lowered program, so a
warm start still traces and lowers the training step (seconds for D0, more
for the large models) before it can look the executable up. This cache is
keyed by what determines that program instead: the run config, the
abstract inputs with their shardings, the devices, the JAX/jaxlib
versions, the XLA flags, the effdet_jax backend and the bytes of the
effdet_jax sources. A hit deserialises the executable
(`jax.experimental.serialize_executable`) without tracing; anything that
fails (a miss, a file from another version, a corrupt file) compiles as
usual and stores the result when XLA compiled it in this call. An
executable that JAX served from its own cache or from memory is not
stored: XLA:CPU serialises a deserialised executable without its kernels
(running it fails with "Function ... not found"). Such a program is
stored the next time XLA compiles it (e.g. with a new JAX cache folder).

Files live in `<compilation_cache.dir>/effdet_jax_executables/`, beside
JAX's own cache, and only the newest `KEEP` are kept. Beside them, keyed by
the config alone (no traced inputs, so they can be read before the model
exists): `.heap`, the bytes a program allocates per call (`heap_hint`), and
`.pkl`, picklable objects such as the model's abstract init trace
(`load_object`); the newest `KEEP` of each kind are kept. It is used by
single-process runs only: an executable of a multi-process computation is
not serialised.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pathlib
import pickle
import threading
from typing import Any

import jax
import jaxlib
import numpy as np

from effdet_jax import files, ops

SUBDIR = 'effdet_jax_executables'
KEEP = 8
# jax.config values that change what a function traces to.
_JAX_OPTIONS = (
  'jax_enable_x64',
  'jax_default_matmul_precision',
  'jax_numpy_rank_promotion',
  'jax_default_prng_impl',
  'jax_threefry_partitionable',
  'jax_numpy_dtype_promotion',
)


@functools.cache
def sources_digest() -> str:
  """sha256 over the package's sources (.py, .cc, .h), names included."""
  root = pathlib.Path(__file__).resolve().parents[1]
  h = hashlib.sha256()
  for p in sorted(root.rglob('*')):
    if p.suffix in ('.py', '.cc', '.h') and p.is_file():
      h.update(str(p.relative_to(root)).encode())
      h.update(p.read_bytes())
  return h.hexdigest()


def _describe(tree: Any) -> str:
  """Structure, shapes, dtypes and shardings of abstract or concrete args."""

  def leaf(x):
    sharding = getattr(x, 'sharding', None)
    devices = ()
    if sharding is not None:  # repr(mesh) does not name the devices
      mesh = getattr(sharding, 'mesh', None)
      devices = (
        tuple(np.ravel(mesh.device_ids).tolist())
        if mesh is not None
        else tuple(sorted(d.id for d in sharding.device_set))
      )
    return (tuple(x.shape), str(x.dtype), repr(sharding), devices)

  leaves, treedef = jax.tree.flatten(tree)
  return repr((str(treedef), [leaf(x) for x in leaves]))


def _environment() -> list[str]:
  """What besides the config and the inputs decides a compiled program:
  versions, devices, XLA flags, the ops backend, JAX options, sources."""
  return [
    jax.__version__,
    jaxlib.__version__,
    repr([(d.platform, d.device_kind, d.id) for d in jax.devices()]),
    str(jax.process_count()),
    os.environ.get('XLA_FLAGS', ''),
    os.environ.get('LIBTPU_INIT_ARGS', ''),
    ops.backend(),
    repr([(o, jax.config.values.get(o)) for o in _JAX_OPTIONS]),
    sources_digest(),
  ]


def _digest(parts: list[str]) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(part.encode())
    h.update(b'\0')
  return h.hexdigest()[:32]


def key(name: str, config_json: str, args: Any) -> str:
  """The cache key of program `name` for a config and its inputs."""
  return _digest([name, config_json, _describe(args), *_environment()])


_local = threading.local()
_HIT = '/jax/compilation_cache/cache_hits'
_COMPILE = '/jax/core/compile/backend_compile_duration'


# Both are recorded in the compiling thread (jax/_src/interpreters/pxla.py:
# _cached_compilation around jax/_src/compiler.py: compile_or_get_cached,
# which records the hit where it reads JAX's cache). Neither is recorded
# when JAX hands back an executable it holds in memory.
def _count_hit(event: str, **_: Any) -> None:
  if event == _HIT:
    _local.hits = getattr(_local, 'hits', 0) + 1


def _count_compile(event: str, duration: float, **_: Any) -> None:
  del duration
  if event == _COMPILE:
    _local.compiles = getattr(_local, 'compiles', 0) + 1


jax.monitoring.register_event_listener(_count_hit)
jax.monitoring.register_event_duration_secs_listener(_count_compile)


def enabled() -> bool:
  """On when JAX's persistent cache is on and this is one process."""
  return bool(jax.config.values.get('jax_compilation_cache_dir')) and (
    jax.process_count() == 1
  )


def _folder() -> str:
  return files.join(jax.config.values['jax_compilation_cache_dir'], SUBDIR)


def _mtime(p: str) -> float:
  # A local file's in nanoseconds; epath's stat gives whole seconds.
  if files.is_remote(p):
    return float(files.path(p).stat().mtime)
  return os.stat(p).st_mtime_ns / 1e9


def _evict(folder: str, suffix: str = '.bin') -> None:
  try:
    names = [n for n in files.listdir(folder) if n.endswith(suffix)]
    if len(names) <= KEEP:
      return
    paths = [files.join(folder, n) for n in names]
    stamps = {p: _mtime(p) for p in paths}
    for p in sorted(paths, key=stamps.get)[: len(paths) - KEEP]:
      files.remove(p)
  except Exception as err:  # noqa: BLE001 - eviction is best effort
    logging.warning('executable cache: eviction failed: %s', err)


def _path(name: str, config_json: str, args: Any) -> str:
  return files.join(_folder(), f'{name}-{key(name, config_json, args)}.bin')


def _config_path(name: str, config_json: str, suffix: str) -> str:
  # Keyed by the config alone (no traced inputs): read before the model
  # or its inputs exist.
  digest = _digest([name, config_json, *_environment()])
  return files.join(_folder(), f'{name}-{digest}{suffix}')


def _hint_path(name: str, config_json: str) -> str:
  return _config_path(name, config_json, '.heap')


def load_object(name: str, config_json: str) -> Any | None:
  """The object `store_object` stored for (name, config), or None (not
  stored, cache off, unreadable: then removed)."""
  if not enabled():
    return None
  path = _config_path(name, config_json, '.pkl')
  try:
    if not files.exists(path):
      return None
    obj = pickle.loads(files.read_bytes(path))
    files.path(path).touch()  # newest use: kept longest
    return obj
  except Exception as err:  # noqa: BLE001 - any failure: recompute
    logging.warning('executable cache: %s unreadable (%s)', path, err)
    with contextlib.suppress(OSError):
      files.remove(path)
    return None


def store_object(name: str, config_json: str, obj: Any) -> None:
  """Stores a picklable `obj` under (name, config) (best effort)."""
  if not enabled():
    return
  try:
    files.makedirs(_folder())
    path = _config_path(name, config_json, '.pkl')
    files.write_bytes(path, pickle.dumps(obj))
    _evict(_folder(), '.pkl')
  except Exception as err:  # noqa: BLE001 - the run goes on uncached
    logging.info('executable cache: %s not stored (%s)', name, err)


def heap_hint(name: str, config_json: str) -> int | None:
  """The bytes one call of program `name` of this config allocated
  (temporaries and outputs not aliased to inputs), as `store_heap_hint`
  recorded them; None when not recorded or the cache is off."""
  if not enabled():
    return None
  try:
    return int(files.read_text(_hint_path(name, config_json)))
  except Exception:  # noqa: BLE001 - missing or unreadable: no hint
    return None


def store_heap_hint(name: str, config_json: str, compiled: Any) -> None:
  """Records `heap_hint` from `compiled`'s memory analysis (best effort)."""
  if not enabled():
    return
  try:
    path = _hint_path(name, config_json)
    m = compiled.memory_analysis()
    nbytes = str(
      int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
    )
    if files.exists(path) and files.read_text(path) == nbytes:
      files.path(path).touch()  # newest use: kept longest
      return
    files.makedirs(_folder())
    files.write_text(path, nbytes)
    _evict(_folder(), '.heap')
  except Exception as err:  # noqa: BLE001 - a hint is optional
    logging.info('executable cache: no heap hint (%s)', err)


def load(name: str, config_json: str, args: tuple) -> Any | None:
  """The stored executable of program `name` for these inputs, or None
  (not stored, cache off, or unreadable: then removed, with a warning)."""
  if not enabled():
    return None
  from jax.experimental import serialize_executable  # noqa: PLC0415

  path = _path(name, config_json, args)
  if not files.exists(path):
    return None
  try:
    stored, device_ids = pickle.loads(files.read_bytes(path))
    by_id = {d.id: d for d in jax.devices()}
    # The devices in the program's own order: by default the loader
    # assigns every device of the backend.
    compiled = serialize_executable.deserialize_and_load(
      *stored, execution_devices=[by_id[i] for i in device_ids]
    )
    files.path(path).touch()  # newest use: kept longest
    return compiled
  except Exception as err:  # noqa: BLE001 - any failure: compile
    logging.warning(
      'executable cache: %s unreadable (%s: %s), compiling',
      path,
      type(err).__name__,
      err,
    )
    with contextlib.suppress(OSError):
      files.remove(path)
    return None


def compile_and_store(
  jitted: Any,
  args: tuple,
  *,
  name: str,
  config_json: str,
  compiler_options: dict | None = None,
) -> tuple[Any, str]:
  """`jitted.lower(*args).compile(compiler_options)`, stored when the cache
  is on and XLA compiled it here; `config_json` must name the options.
  Returns (compiled, how): how is 'compiled' or 'compiled (not stored:
  <reason>)'."""
  _local.hits = _local.compiles = 0
  compiled = jitted.lower(*args).compile(compiler_options or None)
  if not enabled():
    return compiled, 'compiled'
  if _local.hits or not _local.compiles:
    # XLA:CPU serialises an executable it deserialised (JAX's cache) without
    # its kernels ("Function ... not found" when run), and one JAX holds in
    # memory may be such a one: only what XLA compiled here is stored.
    where = 'the JAX cache' if _local.hits else 'memory'
    return compiled, f'compiled (not stored: loaded from {where})'
  from jax.experimental import serialize_executable  # noqa: PLC0415

  try:
    device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
    payload = pickle.dumps(
      (serialize_executable.serialize(compiled), device_ids)
    )
    files.makedirs(_folder())
    files.write_bytes(_path(name, config_json, args), payload)
    _evict(_folder())
  except Exception as err:  # noqa: BLE001 - the run goes on uncached
    return compiled, f'compiled (not stored: {type(err).__name__}: {err})'
  return compiled, 'compiled'


def load_or_compile(
  jitted: Any,
  args: tuple,
  *,
  name: str,
  config_json: str,
  compiler_options: dict | None = None,
) -> tuple[Any, str]:
  """`jitted.lower(*args).compile(compiler_options)`, from the cache when
  it holds it.

  Returns (compiled, how): how is 'loaded', 'compiled' or 'compiled
  (not stored: <reason>)'.
  """
  compiled = load(name, config_json, args)
  if compiled is not None:
    return compiled, 'loaded'
  return compile_and_store(
    jitted,
    args,
    name=name,
    config_json=config_json,
    compiler_options=compiler_options,
  )
