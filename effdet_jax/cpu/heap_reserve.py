"""The first CPU training step's memory, faulted in while the run starts.

With the malloc tunables (`malloc_tuning.py`) and inline dispatch, XLA:CPU
takes a step's temporaries (2.8 GiB for D0 at 512 px, batch 8) from the
main heap, and the first step touches every page of them for the first
time: 780,000 page faults, whose zeroing is 4-9 s of system time on a
2-core VM, most of the first step's wall time (6-7 s against 1.5 s for the
next ones). Because a later step's temporaries did not land where the
first's were freed, a second round of faults followed at step 3.

`HeapReserve.start(nbytes)` allocates that many bytes on the main heap at
start-up (instantly: nothing is touched) and has a daemon thread fault them
in (`madvise(MADV_POPULATE_WRITE)`, else `memset`) while the main thread
imports, restores the state and builds the input, work that leaves the
second core mostly idle. `release()`, just before the first step, frees
the block: glibc keeps it (trim threshold), and the step's temporaries,
the largest request, are carved from it, already faulted in. The size
comes from the executable cache (`runtime/executable_cache.py:
heap_hint`), which records the step's temporaries and outputs when it
stores the step; a run without a stored step starts none.

Only where the block can serve XLA: glibc with the tunables in this
process's environment and one-device inline dispatch, on the main thread.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading

from effdet_jax.cpu import malloc_tuning

_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_PAGE = mmap.PAGESIZE


def _libc() -> ctypes.CDLL:
  # CDLL calls release the GIL: the thread faults pages while Python runs.
  libc = ctypes.CDLL(None, use_errno=True)
  libc.malloc.restype = ctypes.c_void_p
  libc.malloc.argtypes = [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
  libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  return libc


def applies() -> bool:
  """Whether a reserve can serve XLA's buffers in this process: glibc,
  the tunables in effect (set at process start), inline CPU dispatch, and
  called from the main thread (only its heap is the one XLA uses)."""
  if not malloc_tuning.applies():
    return False
  # By value: a user's own mmap_max (kept by malloc_tuning) would have
  # glibc mmap the block and unmap it again at free.
  tunables = os.environ.get('GLIBC_TUNABLES', '').split(':')
  if 'glibc.malloc.mmap_max=0' not in tunables:
    return False
  if threading.current_thread() is not threading.main_thread():
    return False
  import jax  # noqa: PLC0415

  return not jax.config.values.get('jax_cpu_enable_async_dispatch', True)


class HeapReserve:
  """`nbytes` of the main heap, faulted in by a daemon thread."""

  def __init__(self, libc: ctypes.CDLL, address: int, nbytes: int):
    self._libc = libc
    self._address = address
    self.nbytes = nbytes
    self._thread = threading.Thread(
      target=self._populate, name='effdet-heap-reserve', daemon=True
    )
    self._thread.start()

  def _populate(self) -> None:
    start = -(-self._address // _PAGE) * _PAGE
    length = (self._address + self.nbytes - start) // _PAGE * _PAGE
    if self._libc.madvise(start, length, _MADV_POPULATE_WRITE) == 0:
      return
    if ctypes.get_errno() == errno.EINVAL:  # kernels before 5.14
      self._libc.memset(self._address, 0, self.nbytes)
    # Any other error (ENOMEM): leave the pages to the step, as without a
    # reserve, rather than force what the kernel refused.

  def release(self) -> None:
    """Waits for the faulting to end, then frees the block (idempotent)."""
    if self._address is None:
      return
    self._thread.join()
    self._libc.free(self._address)
    self._address = None


_pending: HeapReserve | None = None


def _available_bytes() -> int | None:
  """MemAvailable from /proc/meminfo (None where there is none): the
  reserve is held beside the start-up's other memory."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def start(nbytes: int | None) -> HeapReserve | None:
  """Allocates `nbytes` on the main heap and starts faulting them in; the
  process's pending reserve until `release()`. None (and nothing done)
  where it would not help: `applies()` false, no size, one already
  pending, or malloc refused."""
  global _pending
  if not nbytes or nbytes <= 0 or _pending is not None or not applies():
    return None
  available = _available_bytes()
  if available is not None and nbytes > available // 2:
    logging.info('heap reserve: %d bytes is over half the free memory', nbytes)
    return None
  libc = _libc()
  address = libc.malloc(int(nbytes))
  if not address:
    logging.info('heap reserve: malloc(%d) refused', nbytes)
    return None
  _pending = HeapReserve(libc, address, int(nbytes))
  logging.info('heap reserve: faulting in %.2f GiB', nbytes / 2**30)
  return _pending


def release() -> None:
  """Frees the pending reserve (after its faulting ends), if any: just
  before the first step, whose largest buffers it then holds."""
  global _pending
  if _pending is not None:
    _pending.release()
    _pending = None
