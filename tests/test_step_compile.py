"""The training step compiled ahead of the first batch, and the executable
cache keyed before tracing (`train/step_compile.py`,
`runtime/executable_cache.py`)."""

import logging
import os
import re
import subprocess

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


@pytest.fixture
def cache_dir(tmp_path):
  """JAX's compilation cache folder set to tmp_path for the test (the
  suite's shared folder restored after)."""
  before = jax.config.values.get('jax_compilation_cache_dir')
  jax.config.update('jax_compilation_cache_dir', str(tmp_path))
  yield tmp_path
  jax.config.update('jax_compilation_cache_dir', before)


def _fn():
  return jax.jit(lambda x, y: (jnp.sin(x) @ y, x.sum()))


def test_executable_cache_round_trip(cache_dir, caplog):
  args = (jnp.ones((8, 8)), jnp.arange(64.0).reshape(8, 8))
  first, how = executable_cache.load_or_compile(
    _fn(), args, name='f', config_json='{"a": 1}'
  )
  assert how == 'compiled'
  folder = cache_dir / executable_cache.SUBDIR
  [stored] = list(folder.iterdir())
  second, how = executable_cache.load_or_compile(
    _fn(), args, name='f', config_json='{"a": 1}'
  )
  assert how == 'loaded'
  for a, b in zip(first(*args), second(*args), strict=True):
    np.testing.assert_array_equal(a, b)
  # Another config, other shapes: other keys, compiled.
  _, how = executable_cache.load_or_compile(
    _fn(), args, name='f', config_json='{"a": 2}'
  )
  assert how == 'compiled'
  other = (jnp.ones((4, 8)), jnp.ones((8, 8)))
  _, how = executable_cache.load_or_compile(
    _fn(), other, name='f', config_json='{"a": 1}'
  )
  assert how == 'compiled'
  assert len(list(folder.iterdir())) == 3
  # A corrupt file: a warning, compiled again, the file replaced.
  stored.write_bytes(b'not an executable')
  with caplog.at_level(logging.WARNING):
    third, how = executable_cache.load_or_compile(
      _fn(), args, name='f', config_json='{"a": 1}'
    )
  assert how == 'compiled'
  assert 'unreadable' in caplog.text
  np.testing.assert_array_equal(third(*args)[0], first(*args)[0])
  _, how = executable_cache.load_or_compile(
    _fn(), args, name='f', config_json='{"a": 1}'
  )
  assert how == 'loaded'


def test_executable_cache_keeps_the_newest(cache_dir, monkeypatch):
  monkeypatch.setattr(executable_cache, 'KEEP', 2)
  for n in (2, 3, 4):
    executable_cache.load_or_compile(
      _fn(), (jnp.ones((n, n)), jnp.ones((n, n))), name='f', config_json=''
    )
  kept = list((cache_dir / executable_cache.SUBDIR).glob('*.bin'))
  assert len(kept) == 2


def test_executable_cache_is_off_without_the_compilation_cache():
  before = jax.config.values.get('jax_compilation_cache_dir')
  jax.config.update('jax_compilation_cache_dir', None)
  try:
    assert not executable_cache.enabled()
    _, how = executable_cache.load_or_compile(
      _fn(), (jnp.ones((2, 2)), jnp.ones((2, 2))), name='f', config_json=''
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

  # The suite's compilation cache (conftest): the first run compiles or
  # loads what an earlier test stored; the second must load.
  def run(name, *extra):
    out = subprocess.run(
      demo_cli(
        tmp_path / name,
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
  assert re.search(r'training step: (compiled|loaded)', first)
  second = run('b', '--config.train.log_every_steps=2')
  assert 'training step: loaded' in second
  from effdet_jax import load

  a = jax.device_get(load(str(tmp_path / 'a'))[1])
  b = jax.device_get(load(str(tmp_path / 'b'))[1])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
