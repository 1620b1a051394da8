"""The first step's heap, faulted in ahead (cpu/heap_reserve.py), and the
XLA:CPU compile options of the step (cpu/compile_options.py)."""

import os
import subprocess
import sys
import threading

import pytest

from effdet_jax.cpu import compile_options, heap_reserve, malloc_tuning

# In a fresh process with the tunables: after a reserve of N bytes is
# released, a malloc of N bytes and a write to all of it take (almost) no
# page faults: the block was faulted in by the reserve's thread and kept
# on the main heap. The control run without a reserve faults every page.
_CHILD = r"""
import ctypes, resource, sys
import jax
jax.config.update('jax_cpu_enable_async_dispatch', False)
from effdet_jax.cpu import heap_reserve
n = 256 << 20
if sys.argv[1] == 'reserve':
  assert heap_reserve.start(n) is not None
  heap_reserve.release()
  heap_reserve.release()  # idempotent
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n)
libc.memset(p, 1, n)
print('FAULTS', resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
  out = subprocess.run(
    [sys.executable, '-c', _CHILD, mode],
    env=malloc_tuning.tuned_env(dict(os.environ, JAX_PLATFORMS='cpu')),
    capture_output=True,
    text=True,
    check=True,
  )
  return int(out.stdout.split('FAULTS')[1])


@pytest.mark.skipif(not malloc_tuning.applies(), reason='glibc only')
def test_a_released_reserve_serves_the_next_malloc_without_faults():
  pages = (256 << 20) // 4096
  assert _faults('none') > 0.9 * pages
  assert _faults('reserve') < 0.05 * pages


@pytest.mark.skipif(not malloc_tuning.applies(), reason='glibc only')
def test_no_reserve_where_it_cannot_serve_xla(monkeypatch):
  import jax

  tuned = malloc_tuning.tuned_env()['GLIBC_TUNABLES']
  async_dispatch = jax.config.values['jax_cpu_enable_async_dispatch']
  try:
    jax.config.update('jax_cpu_enable_async_dispatch', False)
    monkeypatch.setenv('GLIBC_TUNABLES', tuned)
    assert heap_reserve.applies()  # main thread, tunables, inline dispatch
    got = []
    thread = threading.Thread(target=lambda: got.append(heap_reserve.applies()))
    thread.start()
    thread.join()
    assert got == [False]  # a thread's malloc is not the main heap's
    assert heap_reserve.start(0) is None and heap_reserve.start(None) is None
    monkeypatch.setenv('GLIBC_TUNABLES', '')  # buffers would be mmap-ed
    assert not heap_reserve.applies()
    # A user's own mmap_max (malloc_tuning keeps it): mmap-ed too.
    monkeypatch.setenv('GLIBC_TUNABLES', tuned.replace('max=0', 'max=65536'))
    assert not heap_reserve.applies()
    assert heap_reserve.start(1 << 20) is None
    monkeypatch.setenv('GLIBC_TUNABLES', tuned)
    jax.config.update('jax_cpu_enable_async_dispatch', True)
    assert not heap_reserve.applies()  # buffers on XLA's pool threads
  finally:
    jax.config.update('jax_cpu_enable_async_dispatch', async_dispatch)


def test_step_compile_options(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '')
  assert compile_options.step_options('cpu') == compile_options.STEP_OPTIONS
  assert compile_options.step_options('tpu') == {}
  assert compile_options.step_options('gpu') == {}
  # The user's (or the test suite's) XLA_FLAGS keep their value.
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0')
  assert compile_options.step_options('cpu') == {
    'xla_llvm_disable_expensive_passes': True
  }
