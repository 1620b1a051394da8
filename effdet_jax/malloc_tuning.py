"""glibc malloc settings for XLA:CPU, applied by re-executing the program.

XLA:CPU allocates every large activation buffer with `malloc` on each
step. glibc serves buffers above 32 MiB with a fresh `mmap` and returns
them with `munmap`, so every step the kernel maps and zeroes gigabytes of
4 KiB pages: on the D0 training step (batch 8, 512 px, 2-core CPU) half
of the wall time was system time. Four glibc tunables remove it: large
buffers come from the heap (`mmap_max=0`), freed memory stays with the
process (`trim_threshold`), the heap uses transparent huge pages
(`hugetlb=1`, glibc >= 2.35; older versions ignore the key), and every
thread allocates from the main heap (`arena_max=1`). The last matters
because XLA allocates a step's temporary buffer (3.7 GiB for that step)
on a pool thread: glibc serves a request too large for a thread arena's
64 MiB heap with `mmap` whatever `mmap_max` says, and the step faulted
the whole buffer in again each time (strace: one mmap/munmap pair per
step). Measured (`tools/benchmark.py`, D0 512 f32): train step b8
4.55 s -> 2.98 s (first three); with the compiled CPU kernels, median
2543 ms (range 1829-3632) -> 2035 ms (1951-2141) with `arena_max=1`.

The price: the process keeps its peak heap until it exits (no memory is
returned to the OS mid-run), which a training or benchmark process
wants anyway. glibc reads tunables only at process start, hence the
re-exec. Set `EFFDET_TUNE_MALLOC=0` to opt out; a `GLIBC_TUNABLES` the
user already set is kept and extended, never overridden.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = (
  'glibc.malloc.hugetlb=1',
  'glibc.malloc.mmap_max=0',
  'glibc.malloc.trim_threshold=1099511627776',
  'glibc.malloc.arena_max=1',
)
OPT_OUT = 'EFFDET_TUNE_MALLOC'


def tuned_env(env: dict[str, str] | None = None) -> dict[str, str]:
  """`env` (default: os.environ) with our tunables added to GLIBC_TUNABLES.

  Keys the user set keep the user's value.
  """
  env = dict(os.environ if env is None else env)
  current = [t for t in env.get('GLIBC_TUNABLES', '').split(':') if t]
  keys = {t.split('=', 1)[0] for t in current}
  extra = [t for t in TUNABLES if t.split('=', 1)[0] not in keys]
  env['GLIBC_TUNABLES'] = ':'.join(current + extra)
  return env


def is_tuned(env: dict[str, str] | None = None) -> bool:
  """True when every tunable key is already in GLIBC_TUNABLES."""
  env = os.environ if env is None else env
  have = env.get('GLIBC_TUNABLES', '')
  return all(t.split('=', 1)[0] in have for t in TUNABLES)


def applies() -> bool:
  """Linux with glibc, and not opted out."""
  if os.environ.get(OPT_OUT, '1') == '0':
    return False
  return sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc'


def reexec_if_untuned() -> None:
  """Re-executes this process (same interpreter and argv) with the tunables.

  Call it first thing under `if __name__ == '__main__'`; it returns
  without doing anything when the settings are in place, do not apply,
  or the original command line is unknown.
  """
  if not applies() or is_tuned():
    return
  argv = getattr(sys, 'orig_argv', None)
  if not argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], tuned_env())
