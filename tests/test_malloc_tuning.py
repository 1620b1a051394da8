"""The glibc-tunables re-exec: runs the program once more, tuned, once."""

import os
import subprocess
import sys

from effdet_jax import malloc_tuning

_SCRIPT = """
import os, sys
with open(sys.argv[1], 'a') as f:
  f.write('start\\n')
from effdet_jax import malloc_tuning
malloc_tuning.reexec_if_untuned()
print(os.environ.get('GLIBC_TUNABLES', ''))
print(sys.argv[2])
"""


def _run(tmp_path, **env_extra):
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
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


def test_single_arena_only_where_the_cpu_kernels_run():
  """`arena_max=1` speeds up the f32 one-device step (compiled kernels)
  and slows the jnp forms (bf16, meshes, kernels off): added only there."""
  cpu = {'JAX_PLATFORMS': 'cpu'}
  assert malloc_tuning.single_arena_helps('float32', cpu)
  assert not malloc_tuning.single_arena_helps('bfloat16', cpu)
  assert not malloc_tuning.single_arena_helps(
    'float32', {**cpu, 'EFFDET_NATIVE_KERNELS': '0'}
  )
  assert not malloc_tuning.single_arena_helps(
    'float32', {**cpu, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  )
  assert malloc_tuning.single_arena_helps(
    'float32', {**cpu, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  )
  assert not malloc_tuning.single_arena_helps(
    'float32', {'JAX_PLATFORMS': 'tpu'}
  )
  one = malloc_tuning.tuned_env({}, single_arena=True)['GLIBC_TUNABLES']
  many = malloc_tuning.tuned_env({})['GLIBC_TUNABLES']
  assert malloc_tuning.SINGLE_ARENA in one.split(':')
  assert 'arena_max' not in many
  # A run tuned without the arena re-executes once more to add it.
  assert not malloc_tuning.is_tuned({'GLIBC_TUNABLES': many}, single_arena=True)
  assert malloc_tuning.is_tuned({'GLIBC_TUNABLES': one}, single_arena=True)
