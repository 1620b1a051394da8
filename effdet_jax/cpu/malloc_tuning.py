"""glibc malloc settings for XLA:CPU, applied by re-executing the program.

XLA:CPU allocates every large activation buffer with `malloc` on each
step. glibc serves buffers above 32 MiB with a fresh `mmap` and returns
them with `munmap`, so every step the kernel maps and zeroes gigabytes of
4 KiB pages: on the D0 training step (batch 8, 512 px, 2-core CPU) half
of the wall time was system time. Two glibc tunables remove it: large
buffers come from the heap (`mmap_max=0`) and freed memory stays with the
process (`trim_threshold`). Measured (`tools/benchmark.py`, D0 512 f32):
train step b8 4.55 s -> 2.98 s.

The heap keeps the kernel's default small pages: no `hugetlb=1`. With
transparent huge pages the first D0 step (b8, 512 px, its 3.0 GiB of
temporaries faulted in for the first time) took 5.4-5.7 s against
2.6-2.7 s with small pages, on a 2-core VM whose huge-page faults are slow
(direct compaction and first touch of host memory); later steps were
3-6 % faster (median 1.33-1.38 s against 1.42-1.44 s). The CPU runs
tests, demos and short fine-tunes, where the time to the first step
counts more; `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` turns them on for a
long CPU run (a user's key is kept).

XLA allocates a step's temporary buffer (3.7 GiB for that step) on the
thread that runs the computation. With JAX's default asynchronous CPU
dispatch that is a pool thread, and glibc serves a request too large for a
thread arena's 64 MiB heap with `mmap` whatever `mmap_max` says: strace
showed one mmap/munmap pair per step, and every other step spent 1.9 s of
system time faulting the buffer in again. `dispatch_inline()` runs
one-device CPU computations on the calling (main) thread instead, whose
main heap honours the tunables: train step median 1.94 s (with the
`arena_max=1` this module used before, which cost lock contention in every
multi-threaded op: one weight-gradient dot 13 -> 52 ms) -> 1.68 s; bf16
3.8 -> 3.4 s; f32 jnp forms 2.8 -> 2.57 s. The GIL is released while the
computation runs, so Python threads (input prefetch) keep going.

The price: the process keeps its peak heap until it exits (no memory is
returned to the OS mid-run), which a training or benchmark process wants
anyway; and on one CPU device Python no longer runs ahead of the
computation, which costs a step's few milliseconds of host work. glibc
reads tunables only at process start, hence the re-exec. Set
`EFFDET_TUNE_MALLOC=0` to opt out of both (asynchronous dispatch comes
back with it); a `GLIBC_TUNABLES` the user already set is kept and
extended, never overridden.

Both apply only where effdet_jax's 'cpu' backend computes
(`cpu_computes`): never on a TPU or GPU host, and not with
`--backend=xla`. The decision is made before JAX starts a backend, from
the requested backend and what JAX would pick (`JAX_PLATFORMS`, the
accelerator plugins installed), without starting one.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
import warnings

TUNABLES = (
  'glibc.malloc.mmap_max=0',
  'glibc.malloc.trim_threshold=1099511627776',
)
SINGLE_ARENA = 'glibc.malloc.arena_max=1'
OPT_OUT = 'EFFDET_TUNE_MALLOC'
BACKEND_ENV = 'EFFDET_JAX_BACKEND'  # = effdet_jax.ops.ENV_VAR
# Modules whose presence makes JAX compute on an accelerator by default:
# TPU (libtpu), CUDA and ROCm PJRT plugins (JAX also finds any plugin under
# the `jax_plugins` namespace or the 'jax_plugins' entry-point group).
ACCELERATOR_MODULES = (
  'libtpu',
  'jax_cuda12_plugin',
  'jax_cuda13_plugin',
  'jax_plugins.xla_cuda12',
  'jax_plugins.xla_cuda13',
  'jax_rocm60_plugin',
  'jax_rocm7_plugin',
  'jax_plugins.xla_rocm60',
  'jax_plugins.xla_rocm7',
)


def _wanted(single_arena: bool) -> tuple[str, ...]:
  return TUNABLES + ((SINGLE_ARENA,) if single_arena else ())


def tuned_env(
  env: dict[str, str] | None = None, single_arena: bool = False
) -> dict[str, str]:
  """`env` (default: os.environ) with our tunables added to GLIBC_TUNABLES.

  Keys the user set keep the user's value.
  """
  env = dict(os.environ if env is None else env)
  current = [t for t in env.get('GLIBC_TUNABLES', '').split(':') if t]
  keys = {t.split('=', 1)[0] for t in current}
  extra = [t for t in _wanted(single_arena) if t.split('=', 1)[0] not in keys]
  env['GLIBC_TUNABLES'] = ':'.join(current + extra)
  return env


def is_tuned(
  env: dict[str, str] | None = None, single_arena: bool = False
) -> bool:
  """True when every tunable key is already in GLIBC_TUNABLES."""
  env = os.environ if env is None else env
  have = env.get('GLIBC_TUNABLES', '')
  return all(t.split('=', 1)[0] in have for t in _wanted(single_arena))


def single_arena_helps(dtype: str, env: dict[str, str] | None = None) -> bool:
  """Deprecated: always False. `arena_max=1` is no longer needed once
  `dispatch_inline()` keeps XLA's buffers on the main heap, and it slowed
  every multi-threaded op with lock contention."""
  del dtype, env
  warnings.warn(
    'single_arena_helps is deprecated: use dispatch_inline()',
    DeprecationWarning,
    stacklevel=2,
  )
  return False


def applies() -> bool:
  """Linux with glibc, and not opted out."""
  if os.environ.get(OPT_OUT, '1') == '0':
    return False
  return sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc'


def _module_installed(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):  # a parent package is missing
    return False


def accelerator_plugin_installed() -> bool:
  """True when JAX would find a TPU/GPU plugin (a module of
  ACCELERATOR_MODULES, anything in the `jax_plugins` namespace or the
  'jax_plugins' entry-point group). Imports nothing."""
  if any(_module_installed(m) for m in ACCELERATOR_MODULES):
    return True
  if _module_installed('jax_plugins'):
    return True
  try:
    return bool(importlib.metadata.entry_points(group='jax_plugins'))
  except Exception:  # noqa: BLE001 - broken metadata: assume none
    return False


def _jax_platforms() -> str:
  """The platforms JAX was asked for ('' = its own choice)."""
  jax = sys.modules.get('jax')  # a program may set it before calling us
  if jax is not None:
    try:
      value = jax.config.jax_platforms
    except AttributeError:
      value = None
    if value:
      return str(value)
  return os.environ.get('JAX_PLATFORMS') or os.environ.get(
    'JAX_PLATFORM_NAME', ''
  )


def cpu_computes(backend: str | None = None) -> bool:
  """True when effdet_jax's 'cpu' backend will compute in this process:
  `backend` (None: `$EFFDET_JAX_BACKEND`, default 'auto') is 'cpu', or
  'auto' and JAX will run on the CPU (`JAX_PLATFORMS` / `jax_platforms`
  starts with cpu, or none is set and no accelerator plugin is installed).
  'xla' is always False. Decided without starting a JAX backend."""
  requested = backend or os.environ.get(BACKEND_ENV) or 'auto'
  if requested == 'cpu':
    return True
  if requested != 'auto':
    return False
  platforms = _jax_platforms()
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  return not accelerator_plugin_installed()


def backend_from_argv(argv: list[str]) -> str | None:
  """The `--backend` value of a command line (None: not given), for a
  re-exec decided before flags are parsed. A `--flagfile` could set it:
  then 'undecided', which `reexec_if_untuned` leaves to a later call."""
  value = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith('--flagfile'):
      return 'undecided'
    if arg.startswith('--backend='):
      value = arg.split('=', 1)[1]
    elif arg == '--backend' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def reexec_if_untuned(
  single_arena: bool = False, backend: str | None = None
) -> None:
  """Re-executes this process (same interpreter and argv) with the tunables
  (and `arena_max=1` when `single_arena`; nothing in effdet_jax asks for it
  any more, see the module docstring).

  Call it first thing, before JAX starts a backend; it returns without
  doing anything when the settings are in place, do not apply, the 'cpu'
  backend will not compute (`cpu_computes(backend)`), or the original
  command line is unknown.
  """
  if not applies() or is_tuned(single_arena=single_arena):
    return
  if backend == 'undecided' or not cpu_computes(backend):
    return
  argv = getattr(sys, 'orig_argv', None)
  if not argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(
    sys.executable,
    [sys.executable, *argv[1:]],
    tuned_env(single_arena=single_arena),
  )


def dispatch_inline(backend: str | None = None) -> None:
  """Runs one-device CPU computations on the calling thread, so XLA's
  per-step buffers come from the main heap the tunables keep (see the
  module docstring). Call it before JAX starts its CPU backend; a no-op
  where the tunables do not apply or the 'cpu' backend will not compute
  (`cpu_computes(backend)`). Multi-device computations keep JAX's
  asynchronous dispatch (the flag does not cover them)."""
  if not applies() or not cpu_computes(backend):
    return
  import jax  # noqa: PLC0415 - callers re-exec before importing JAX

  jax.config.update('jax_cpu_enable_async_dispatch', False)
