"""The training step compiled ahead of the first batch, and the executable
cache keyed before tracing (`train/step_compile.py`,
`runtime/executable_cache.py`)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, shared_path, xla_flags
from train_utils import demo_cli

from effdet_jax.data import pipeline, testing
from effdet_jax.runtime import executable_cache, partitioning
from effdet_jax.train import step_compile


def _mesh_shardings(batch):
  mesh = partitioning.make_mesh(testing.small_config().mesh, jax.devices()[:1])
  return partitioning.batch_shardings(mesh, batch)


@pytest.mark.parametrize('source', ['synthetic', 'tfrecord'])
def test_batch_spec_is_what_the_pipeline_yields(source):
  """The step is compiled for `batch_spec(config)` before any record is
  read: it must be the trainer's batch (image, boxes, classes) exactly."""
  kw = dict(source='synthetic', synthetic_num_classes=3)
  if source == 'tfrecord':
    kw = dict(
      source='tfrecord',
      train_pattern=str(
        shared_path('oracle', 'official-tfrecord-coco16') / 'coco16-*.tfrecord'
      ),
    )
  config = testing.small_config(image_size=(96, 128), batch_size=2, **kw)
  config.data.max_instances_per_image = 17
  batch = next(pipeline.train_dataset(config).as_numpy_iterator())
  spec = step_compile.batch_spec(config, _mesh_shardings)
  assert set(spec) == {'image', 'boxes', 'classes'}
  for key, want in spec.items():
    assert batch[key].shape == want.shape, key
    assert batch[key].dtype == want.dtype, key
    assert want.sharding is not None


_CACHE_SCRIPT = r"""
import logging, pathlib, sys
import jax, jax.numpy as jnp, numpy as np
from effdet_jax.runtime import executable_cache as ec

tmp = pathlib.Path(sys.argv[1])
jax.config.update('jax_compilation_cache_dir', str(tmp))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
folder = tmp / ec.SUBDIR


def f(x, w):
  for i in range(4):
    x = jnp.tanh(x @ w) * (x.sum(0) + i)
  return x.sum(), (x * x).sum(1)


def run(args, config='{"a": 1}'):
  return ec.load_or_compile(jax.jit(f), args, name='f', config_json=config)


args = (jnp.ones((16, 16)), jnp.full((16, 16), 0.01))
if sys.argv[2] == 'fill':  # JAX's cache now holds the program
  jax.jit(f)(*args)
  sys.exit(0)
# Served by JAX's cache (written by the first process): XLA:CPU would
# serialise it without its kernels.
_, how = run(args)
assert how == 'compiled (not stored: loaded from the JAX cache)', how
assert not folder.exists()
# JAX keeps that executable in memory: not stored either.
_, how = run(args)
assert how == 'compiled (not stored: loaded from memory)', how
# A program XLA compiles here is stored.
args = (jnp.ones((12, 16)), args[1])
fresh, how = run(args)
want = fresh(*args)
[stored] = list(folder.iterdir())
loaded, how = run(args)
assert how == 'loaded', how
for a, b in zip(loaded(*args), want, strict=True):
  np.testing.assert_array_equal(a, b)
# Another config, other shapes: other keys.
assert ec.key('f', '{"a": 2}', args) != ec.key('f', '{"a": 1}', args)
assert run(args, config='{"a": 2}')[1] != 'loaded'
assert run((jnp.ones((8, 16)), args[1]))[1] == 'compiled'
assert len(list(folder.iterdir())) == 2
# A corrupt file: a warning, removed, compiled again.
stored.write_bytes(b'not an executable')
assert run(args)[1].startswith('compiled')
assert not stored.exists()
# Only the newest KEEP are kept.
ec.KEEP = 1
newest = (jnp.ones((4, 16)), args[1])
assert run(newest)[1] == 'compiled'
[kept] = list(folder.glob('*.bin'))
assert ec.key('f', '{"a": 1}', newest) in kept.name
print('OK')
"""


def test_executable_cache_round_trip(tmp_path):
  """Stored after a fresh compile, loaded with the same results, keyed by
  config and shapes, never stored from JAX's cache, corrupt files compiled
  again, the newest kept. In its own process: JAX's cache folder is set
  once per process."""
  env = {
    k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'
  }
  for mode in ('fill', 'check'):
    out = subprocess.run(
      [sys.executable, '-c', _CACHE_SCRIPT, str(tmp_path), mode],
      cwd=REPO,
      env=dict(env, XLA_FLAGS=xla_flags(1)),
      capture_output=True,
      text=True,
      check=False,
    )
  assert out.returncode == 0 and 'OK' in out.stdout, out.stderr[-3000:]
  assert 'unreadable' in out.stderr  # the corrupt file's warning


def test_the_init_trace_is_cached_and_gives_the_same_state(tmp_path):
  """`Trainer(cache_trace=True)` stores the model's abstract init trace
  (structure and initialisers) and a second trainer takes it from there:
  the same structure, the same initialisers, the same fresh state bit for
  bit; a corrupt entry is traced again."""
  from train_utils import tiny_config

  from effdet_jax.train.trainer import Trainer

  before = jax.config.values.get('jax_compilation_cache_dir')
  jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'cache'))
  try:
    config = tiny_config(batch_size=2)
    config.mesh.data = 1
    devices = jax.devices()[:1]
    first = Trainer(config, str(tmp_path), devices, cache_trace=True)
    [stored] = (tmp_path / 'cache' / executable_cache.SUBDIR).glob('*.pkl')
    second = Trainer(config, str(tmp_path), devices, cache_trace=True)
    assert second._traced[1] == first._traced[1]  # path -> initialiser
    assert jax.tree.structure(second._traced[0]) == jax.tree.structure(
      first._traced[0]
    )
    a, b = first.host_state(), second.host_state()
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(x, y)
    stored.write_bytes(b'not a pickle')
    third = Trainer(config, str(tmp_path), devices, cache_trace=True)
    assert third._traced[1] == first._traced[1]
  finally:
    jax.config.update('jax_compilation_cache_dir', before)


def test_executable_cache_is_off_without_the_compilation_cache():
  before = jax.config.values.get('jax_compilation_cache_dir')
  jax.config.update('jax_compilation_cache_dir', None)
  try:
    assert not executable_cache.enabled()
    fn = jax.jit(lambda x: x * 2)
    _, how = executable_cache.load_or_compile(
      fn, (jnp.ones((2, 2)),), name='f', config_json=''
    )
    assert how == 'compiled'
  finally:
    jax.config.update('jax_compilation_cache_dir', before)


@pytest.mark.slow
def test_a_second_run_loads_the_step_and_trains_the_same(tmp_path):
  """The CLI compiles the step ahead (no 'differs' warning: the predicted
  batch was the real one) and stores it; a second run whose config differs
  in a field the step does not read loads it without tracing, and trains
  bit for bit the same."""

  # A cache of its own: the suite's may hold the step in JAX's cache
  # already, and such a step is not stored (runtime/executable_cache.py).
  cache = tmp_path / 'cache'

  def run(name, *extra):
    out = subprocess.run(
      demo_cli(
        tmp_path / name,
        f'--config.compilation_cache.dir={cache}',
        '--config.train.num_steps=3',
        '--config.eval.every_steps=0',
        *extra,
        '--verbose',
      ),
      cwd=REPO,
      env=dict(os.environ, XLA_FLAGS=xla_flags(1)),
      capture_output=True,
      text=True,
      check=False,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert 'compiling again' not in text
    return text

  first = run('a')
  assert 'training step: compiled\n' in first
  # The step's memory is recorded beside it (runtime/executable_cache.py:
  # heap_hint), and the next run faults it in ahead (cpu/heap_reserve.py).
  hints = list((cache / 'effdet_jax_executables').glob('train_step-*.heap'))
  assert len(hints) == 1 and int(hints[0].read_text()) > (1 << 20)
  assert list((cache / 'effdet_jax_executables').glob('init_trace-*.pkl'))
  second = run('b', '--config.train.log_every_steps=2')
  assert 'training step: loaded' in second
  assert 'heap reserve: faulting in' in second
  from effdet_jax import load

  a = jax.device_get(load(str(tmp_path / 'a'))[1])
  b = jax.device_get(load(str(tmp_path / 'b'))[1])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_step_compiler_hands_over_a_working_step(tmp_path):
  """Compiled in the background thread from the predicted batch, the step
  runs on the real one. (Compiling when the first batch is in is what every
  CLI run on fewer than 4 cores does, and caller batches go through `get`
  in the training tests.)"""
  from train_utils import fixed_batch, tiny_config

  from effdet_jax.train.trainer import Trainer

  config = tiny_config(batch_size=2)
  config.mesh.data = 1
  config.data.max_instances_per_image = 10  # fixed_batch's boxes
  tr = Trainer(config, str(tmp_path), jax.devices()[:1])
  compiler = step_compile.StepCompiler.ahead(tr, config, compile_ahead=True)
  host = fixed_batch(config)
  sh = tr.batch_sharding(host)
  batch = {k: jax.device_put(v, sh[k]) for k, v in host.items()}
  batch['learning_rate'] = tr.learning_rate(0)
  step = compiler.get(batch)
  assert compiler.how.startswith(('compiled', 'loaded')), compiler.how
  state, metrics = step(tr.to_loop(tr.fresh_state()), batch)
  assert np.isfinite(float(metrics['loss']))
  assert int(state.step) == 1
