"""The glibc-tunables re-exec: runs the program once more, tuned, once."""

import os
import subprocess
import sys

import pytest

from effdet_jax.cpu import malloc_tuning

_SCRIPT = """
import os, sys
with open(sys.argv[1], 'a') as f:
  f.write('start\\n')
from effdet_jax.cpu import malloc_tuning
malloc_tuning.reexec_if_untuned()
print(os.environ.get('GLIBC_TUNABLES', ''))
print(sys.argv[2])
"""


def _run(tmp_path, **env_extra):
  drop = ('GLIBC_TUNABLES', 'JAX_PLATFORMS', 'JAX_PLATFORM_NAME')
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env[malloc_tuning.BACKEND_ENV] = 'cpu'  # this host's plugins aside
  env.update(env_extra)
  script = tmp_path / 'prog.py'
  script.write_text(_SCRIPT)
  log = tmp_path / 'starts.txt'
  out = subprocess.run(
    [sys.executable, str(script), str(log), 'the-arg'],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  return log.read_text().count('start'), out.stdout.splitlines()


def test_reexecs_once_with_the_tunables_and_same_argv(tmp_path):
  starts, lines = _run(tmp_path)
  if not malloc_tuning.applies():  # not glibc Linux: nothing to do
    assert starts == 1
    return
  assert starts == 2
  for tunable in malloc_tuning.TUNABLES:
    assert tunable in lines[0].split(':')
  assert lines[1] == 'the-arg'


def test_opt_out(tmp_path):
  starts, lines = _run(tmp_path, EFFDET_TUNE_MALLOC='0')
  assert starts == 1
  assert lines[0] == ''


@pytest.mark.parametrize(
  'env',
  [
    {'EFFDET_JAX_BACKEND': 'xla'},
    {'EFFDET_JAX_BACKEND': 'auto', 'JAX_PLATFORMS': 'tpu'},
  ],
)
def test_no_reexec_where_the_cpu_backend_does_not_compute(tmp_path, env):
  starts, lines = _run(tmp_path, **env)
  assert starts == 1
  assert lines[0] == ''


_BACKEND_CASES = [
  # (requested, JAX_PLATFORMS, accelerator plugin installed) -> expected
  ('cpu', '', True, True),
  ('cpu', 'cuda', False, True),  # asked for: set_backend will say why not
  ('xla', '', False, False),
  ('xla', 'cpu', False, False),
  ('auto', 'cpu', True, True),
  ('auto', 'cpu,cuda', True, True),
  ('auto', 'cuda,cpu', False, False),
  ('auto', 'tpu', False, False),
  ('auto', '', False, True),
  ('auto', '', True, False),
  (None, '', False, True),  # None: $EFFDET_JAX_BACKEND, default auto
]


@pytest.mark.parametrize('requested,platforms,plugin,want', _BACKEND_CASES)
def test_cpu_computes(monkeypatch, requested, platforms, plugin, want):
  for var in ('EFFDET_JAX_BACKEND', 'JAX_PLATFORMS', 'JAX_PLATFORM_NAME'):
    monkeypatch.delenv(var, raising=False)
  if platforms:
    monkeypatch.setenv('JAX_PLATFORMS', platforms)
  # The test process may have imported JAX: its config wins over the env.
  monkeypatch.setattr(malloc_tuning, '_jax_platforms', lambda: platforms)
  monkeypatch.setattr(
    malloc_tuning, 'accelerator_plugin_installed', lambda: plugin
  )
  assert malloc_tuning.cpu_computes(requested) is want


def test_cpu_computes_reads_the_backend_env(monkeypatch):
  monkeypatch.setattr(malloc_tuning, '_jax_platforms', lambda: '')
  monkeypatch.setattr(
    malloc_tuning, 'accelerator_plugin_installed', lambda: False
  )
  monkeypatch.setenv('EFFDET_JAX_BACKEND', 'xla')
  assert not malloc_tuning.cpu_computes()
  assert malloc_tuning.cpu_computes('cpu')  # an explicit choice wins
  monkeypatch.setenv('EFFDET_JAX_BACKEND', 'cpu')
  assert malloc_tuning.cpu_computes()
  assert not malloc_tuning.cpu_computes('xla')


def test_plugins_are_found_without_importing_them(monkeypatch):
  before = set(sys.modules)
  assert isinstance(malloc_tuning.accelerator_plugin_installed(), bool)
  assert not {m for m in set(sys.modules) - before if 'plugin' in m}
  # A namespace child whose parent is missing is simply absent.
  assert not malloc_tuning._module_installed('no_such_namespace.xla_cuda12')
  monkeypatch.setattr(
    malloc_tuning, '_module_installed', lambda n: n == 'jax_cuda12_plugin'
  )
  assert malloc_tuning.accelerator_plugin_installed()


def test_user_values_are_kept():
  env = malloc_tuning.tuned_env(
    {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2'}
  )
  parts = env['GLIBC_TUNABLES'].split(':')
  assert 'glibc.malloc.hugetlb=0' in parts
  assert 'glibc.malloc.hugetlb=1' not in parts
  assert 'glibc.malloc.arena_max=2' in parts
  assert 'glibc.malloc.mmap_max=0' in parts
  assert malloc_tuning.is_tuned(env)
  assert not malloc_tuning.is_tuned(
    {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  )


_FAULTS = """
import resource, sys
from effdet_jax.cpu import malloc_tuning
if sys.argv[1] == 'inline':
  malloc_tuning.dispatch_inline()
import jax, jax.numpy as jnp

@jax.jit
def f(x, w1, w2):  # the 128 MiB `x @ w1` is a temporary XLA must allocate
  return jnp.sum((x @ w1) @ w2)

x = jnp.ones((4096, 256)); w1 = jnp.ones((256, 8192)); w2 = jnp.ones((8192, 1))
f(x, w1, w2).block_until_ready()
f(x, w1, w2).block_until_ready()
per_call = []
for _ in range(7):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w1, w2).block_until_ready()
  per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median: one call's faults from outside (page reclaim under a loaded
# machine's memory pressure) made a mean flaky.
print(sorted(per_call)[3])
"""


@pytest.mark.slow
def test_inline_dispatch_keeps_the_step_buffer_on_the_main_heap(tmp_path):
  """With asynchronous dispatch a pool thread allocates XLA's temporary
  buffer, from a thread arena that must `mmap` it afresh on every call
  (page faults each time); run inline, it comes from the tuned main heap
  and is reused."""
  if not malloc_tuning.applies():
    return
  script = tmp_path / 'faults.py'
  script.write_text(_FAULTS)
  env = malloc_tuning.tuned_env()
  faults = {}
  for mode in ('async', 'inline'):
    out = subprocess.run(
      [sys.executable, str(script), mode],
      env=env,
      capture_output=True,
      text=True,
      check=True,
    )
    faults[mode] = float(out.stdout.split()[-1])
  # 128 MiB is 64 transparent huge pages, or 32768 small ones.
  assert faults['async'] >= 32, faults
  assert faults['inline'] < faults['async'] / 4, faults


def test_single_arena_helps_is_deprecated():
  with pytest.warns(DeprecationWarning):
    assert not malloc_tuning.single_arena_helps('float32')
  one = malloc_tuning.tuned_env({}, single_arena=True)['GLIBC_TUNABLES']
  many = malloc_tuning.tuned_env({})['GLIBC_TUNABLES']
  assert malloc_tuning.SINGLE_ARENA in one.split(':')
  assert 'arena_max' not in many


@pytest.mark.parametrize(
  'argv, want',
  [
    (['main.py', '--config=c.py'], None),
    (['main.py', '--backend=xla', '--workdir=w'], 'xla'),
    (['main.py', '--backend', 'cpu'], 'cpu'),
    (['main.py', '--flagfile=f.txt'], 'undecided'),
  ],
)
def test_backend_from_argv(argv, want):
  assert malloc_tuning.backend_from_argv(argv) == want


def test_package_import_leaves_jax_for_after_the_reexec():
  # `python -m effdet_jax.main` imports the package first: were JAX, Flax
  # or TensorFlow imported there, the re-executed process would pay again.
  code = (
    'import sys, effdet_jax, effdet_jax.cpu.malloc_tuning\n'
    "heavy = [m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules]\n"
    'print(heavy)\n'
    'assert effdet_jax.create_model.__module__ == "effdet_jax.api"\n'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == '[]'
