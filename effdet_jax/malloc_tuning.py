"""glibc malloc settings for XLA:CPU, applied by re-executing the program.

XLA:CPU allocates every large activation buffer with `malloc` on each
step. glibc serves buffers above 32 MiB with a fresh `mmap` and returns
them with `munmap`, so every step the kernel maps and zeroes gigabytes of
4 KiB pages: on the D0 training step (batch 8, 512 px, 2-core CPU) half
of the wall time was system time. Three glibc tunables remove it: large
buffers come from the heap (`mmap_max=0`), freed memory stays with the
process (`trim_threshold`), the heap uses transparent huge pages
(`hugetlb=1`, glibc >= 2.35; older versions ignore the key).
Measured (`tools/benchmark.py`, D0 512 f32): train step b8 4.55 s -> 2.98 s.

A fourth, `arena_max=1` (every thread allocates from the main heap), is
added only where it was measured to help: f32 on one CPU device, where the
compiled CPU kernels run. XLA allocates a step's temporary buffer (3.7 GiB
for that step) on a pool thread, and glibc serves a request too large for a
thread arena's 64 MiB heap with `mmap` whatever `mmap_max` says, so the
step faulted the whole buffer in again each time (strace: one mmap/munmap
pair per step): median 2543 ms (range 1829-3632) -> 2035 ms (1951-2141).
Where XLA runs the jnp forms instead (bf16, a multi-device mesh,
`EFFDET_NATIVE_KERNELS=0`) the step is slower with it (bf16 train step
3461 -> 5169 ms, f32 jnp forms 2923 -> 3705 ms; perf puts 7 % of that run's
samples in `_int_malloc` and 11 % in the kernel clearing pages), so there
glibc keeps its per-thread arenas.

The price: the process keeps its peak heap until it exits (no memory is
returned to the OS mid-run), which a training or benchmark process
wants anyway. glibc reads tunables only at process start, hence the
re-exec. Set `EFFDET_TUNE_MALLOC=0` to opt out; a `GLIBC_TUNABLES` the
user already set is kept and extended, never overridden.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import sys

TUNABLES = (
  'glibc.malloc.hugetlb=1',
  'glibc.malloc.mmap_max=0',
  'glibc.malloc.trim_threshold=1099511627776',
)
SINGLE_ARENA = 'glibc.malloc.arena_max=1'
OPT_OUT = 'EFFDET_TUNE_MALLOC'


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


def _accelerator_present() -> bool:
  """TPU (/dev/accel*, /dev/vfio/N) or NVIDIA device nodes, without
  initialising a JAX backend (the re-exec comes before that)."""
  for pattern in ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*'):
    if glob.glob(pattern):
      return True
  return False


def single_arena_helps(dtype: str, env: dict[str, str] | None = None) -> bool:
  """Whether this run will use the compiled CPU kernels (f32, one CPU
  device), the case `arena_max=1` was measured to speed up."""
  env = os.environ if env is None else env
  if str(dtype) != 'float32' or env.get('EFFDET_NATIVE_KERNELS') == '0':
    return False
  forced = re.search(
    r'xla_force_host_platform_device_count=(\d+)', env.get('XLA_FLAGS', '')
  )
  if forced and int(forced.group(1)) > 1:
    return False
  platforms = env.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not _accelerator_present()


def applies() -> bool:
  """Linux with glibc, and not opted out."""
  if os.environ.get(OPT_OUT, '1') == '0':
    return False
  return sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc'


def reexec_if_untuned(single_arena: bool = False) -> None:
  """Re-executes this process (same interpreter and argv) with the tunables
  (and `arena_max=1` when `single_arena`, see `single_arena_helps`).

  Call it first thing, before JAX starts a backend; it returns without
  doing anything when the settings are in place, do not apply, or the
  original command line is unknown.
  """
  if not applies() or is_tuned(single_arena=single_arena):
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
