"""Builds and registers the XLA:CPU custom calls in this folder.

The C++ sources (`*.cc`, `*.h`) are compiled on first use with
the system C++ compiler (`-O3 -march=native`) into one shared library in a
per-user cache (`$EFFDET_KERNEL_CACHE`, else `~/.cache/effdet_jax/kernels`),
keyed by the sources, jaxlib's FFI headers, the flags and the CPU. Without
a compiler, or with `EFFDET_NATIVE_KERNELS=0`, `load()` is False and the
models keep their jnp forms, which compute the same functions.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
from absl import logging

_DIR = pathlib.Path(__file__).parent
_FLAGS = ('-O3', '-march=native', '-std=c++20', '-shared', '-fPIC', '-w')
# Every handler symbol the sources define (XLA_FFI_DEFINE_HANDLER_SYMBOL).
TARGETS = (
  'EffdetDepthwiseForward',
  'EffdetDepthwiseInputGrad',
  'EffdetDepthwiseKernelGrad',
  'EffdetDepthwiseForwardAffineAct',
  'EffdetDepthwiseForwardAffineActPooled',
  'EffdetExpandDepthwiseAffineAct',
  'EffdetExpandDepthwiseAffineActPooled',
  'EffdetBatchNormForward',
  'EffdetBatchNormBackward',
  'EffdetBatchNormForwardPooled',
  'EffdetBatchNormBackwardPooled',
  'EffdetFocalLoss',
  'EffdetPointwiseAffineAct',
  'EffdetIm2colAffineAct',
  'EffdetPointwiseBnForward',
  'EffdetPointwiseBnBackward',
  'EffdetWeightGrad',
  'EffdetIm2colWeightGrad',
  'EffdetBestMatches',
  'EffdetFusionAct',
  'EffdetFusionActBackward',
)


def _sources() -> list[pathlib.Path]:
  return sorted(_DIR.glob('*.cc'))


def _cpu_id() -> str:
  try:
    text = pathlib.Path('/proc/cpuinfo').read_text()
  except OSError:
    return platform.processor()
  keep = ('model name', 'flags')
  return '\n'.join(
    sorted({ln for ln in text.splitlines() if ln.startswith(keep)})
  )


def _cache_dir() -> pathlib.Path:
  root = os.environ.get('EFFDET_KERNEL_CACHE') or os.path.join(
    os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')),
    'effdet_jax',
    'kernels',
  )
  return pathlib.Path(root)


def _build(compiler: str) -> pathlib.Path:
  if not _sources():
    raise OSError(f'no kernel sources in {_DIR} (package data not installed)')
  include = jax.ffi.include_dir()
  key = hashlib.sha256()
  for path in [*_sources(), *sorted(_DIR.glob('*.h'))]:
    key.update(path.name.encode() + path.read_bytes())
  key.update(pathlib.Path(include, 'xla/ffi/api/ffi.h').read_bytes())
  key.update(' '.join((compiler,) + _FLAGS).encode())
  key.update(_cpu_id().encode())
  lib = _cache_dir() / f'effdet_cpu_{key.hexdigest()[:16]}.so'
  if lib.exists():
    return lib
  lib.parent.mkdir(parents=True, exist_ok=True)
  # Build under a temporary name, then rename: concurrent processes (pytest
  # workers, hosts sharing a home directory) never load a half-written file.
  with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
    out = pathlib.Path(tmp, lib.name)
    cmd = [compiler, *_FLAGS, f'-I{include}', *map(str, _sources())]
    subprocess.run(
      [*cmd, '-o', str(out)], check=True, capture_output=True, text=True
    )
    os.replace(out, lib)
  return lib


@functools.cache
def load() -> bool:
  """Builds (once per machine) and registers the custom calls; False if not."""
  if os.environ.get('EFFDET_NATIVE_KERNELS', '1') == '0':
    return False
  if jax.default_backend() != 'cpu' or not hasattr(jax, 'ffi'):
    return False
  compiler = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
  if compiler is None:
    logging.info('effdet_jax CPU kernels: no C++ compiler, using jnp forms')
    return False
  try:
    lib = ctypes.CDLL(str(_build(compiler)))
  except (OSError, subprocess.CalledProcessError) as e:
    detail = getattr(e, 'stderr', None) or str(e)
    logging.warning('effdet_jax CPU kernels not built: %s', detail[-2000:])
    return False
  for name in TARGETS:
    jax.ffi.register_ffi_target(
      name, jax.ffi.pycapsule(getattr(lib, name)), platform='cpu'
    )
  return True


_FORCED: bool | None = None


@contextlib.contextmanager
def forced(on: bool = True):
  """Within the block, `enabled()` is `on` (if the kernels are built).

  For tests and benchmarks that run one-device computations in a process
  with several (emulated) devices. The choice is made when a function is
  traced, and JAX's caches do not know of it: they are cleared on entry
  and exit, so a jitted function traced outside the block is traced again
  inside it (and the other way round).
  """
  global _FORCED
  before, _FORCED = _FORCED, on
  jax.clear_caches()
  try:
    yield
  finally:
    _FORCED = before
    jax.clear_caches()


def enabled() -> bool:
  """Whether models pick the custom calls automatically.

  Built, and one device: a custom call has no sharding rule, so on a mesh
  GSPMD would gather its operands; there the jnp forms (which shard) run.
  """
  if not load():
    return False
  if _FORCED is not None:
    return _FORCED
  return jax.device_count() == 1


def call(target: str, results, *args, **attrs):
  """`jax.ffi.ffi_call` of one of `TARGETS` (built on first use)."""
  if not load():
    raise RuntimeError(
      f'{target}: the effdet_jax CPU kernels are not built here'
    )
  return jax.ffi.ffi_call(target, results, vmap_method='sequential')(
    *args, **attrs
  )


# The kernels' activation codes: `enum Act` in cpu_common.h.
_NONE, _SWISH, _RELU, _RELU6 = 0, 1, 2, 3


def act_code(act) -> int | None:
  """The kernels' code for the activation `act`, or None if none has one."""
  if act is None:
    return _NONE
  if act is jax.nn.relu:
    return _RELU
  if act is jax.nn.silu or act is jax.nn.swish:
    return _SWISH
  if getattr(act, '__module__', '') == 'effdet_jax.models.layers':
    return {'swish': _SWISH, 'relu6': _RELU6}.get(act.__name__)
  return None
