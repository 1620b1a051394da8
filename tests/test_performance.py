"""The fast forms compute the same functions; benchmark mode and the
compilation cache work. (Speed itself is measured in benchmarks/.)"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import tiny_config

from effdet_jax.cpu import focal
from effdet_jax.detection import losses
from effdet_jax.models import layers
from effdet_jax.tools import benchmark


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.slow
def test_fused_focal_loss_equals_textbook_form(dtype):
  """Value and gradient equal the official formula
  (`efficientdet/det_model_fn.py: focal_loss`) on one-hot labels,
  background (-1) rows included."""
  rng = np.random.default_rng(0)
  b, h, w, a, c = 2, 3, 5, 9, 7
  x = jnp.asarray(rng.normal(size=(b, h, w, a * c)) * 4, dtype)
  ids = jnp.asarray(rng.integers(-1, c, (b, h * w * a)), jnp.int32)

  def textbook(x):
    one_hot = jax.nn.one_hot(ids, c, dtype=jnp.float32)
    logits = x.astype(jnp.float32).reshape(b, -1, c)
    return jnp.sum(losses.focal_loss(logits, one_hot, 0.25, 1.5))

  def fused(x):
    return focal.focal_loss_sum(x, ids, c, 0.25, 1.5)

  np.testing.assert_allclose(fused(x), textbook(x), rtol=1e-5)
  g_ref = np.asarray(jax.grad(textbook)(x), np.float32)
  g = np.asarray(jax.grad(fused)(x), np.float32)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(g, g_ref, atol=tol * np.abs(g_ref).max())
  assert g.dtype == np.float32 and jax.grad(fused)(x).dtype == dtype


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.slow
def test_conv_1x1_as_dot_equals_convolution(stride):
  """`layers.Conv` (dot for 1x1 stride 1, lax conv otherwise) equals
  flax's nn.Conv with the same parameters, forward and kernel gradient."""
  import flax.linen as nn

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 7, 5))
  for k in (1, 3):
    ours = layers.Conv(4, k, stride)
    ref = nn.Conv(4, (k, k), strides=(stride, stride), padding='SAME')
    v = ours.init(jax.random.PRNGKey(1), x)
    f = lambda m: lambda w: jnp.sum(jnp.sin(m.apply(w, x)))  # noqa: E731
    np.testing.assert_allclose(
      ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5
    )
    g1, g2 = jax.grad(f(ours))(v), jax.grad(f(ref))(v)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('mode', ['forward', 'e2e', 'train'])
@pytest.mark.slow
def test_benchmark_mode_reports_the_documented_keys(mode):
  config = tiny_config(batch_size=2)
  row = benchmark.run(
    config, mode, 2, min_iters=2, min_time_s=0.0, measure_peak=False
  )
  for key in ('images_per_sec', 'median_ms', 'compile_s', 'peak_memory_bytes'):
    assert key in row, key
  assert row['iterations'] >= 2 and row['images_per_sec'] > 0
  assert row['min_ms'] <= row['median_ms'] <= row['max_ms']
  json.dumps(row)  # the --format=json object


def test_matmul_peak_is_plausible():
  peak = benchmark.matmul_peak_flops(n=256, repeats=3)
  assert 1e8 < peak < 1e15


@pytest.mark.slow
def test_compilation_cache_is_switched_by_config(tmp_path):
  """A run with `compilation_cache.dir` writes compiled programs there; a
  second process finds them (cache hits are logged by JAX)."""
  script = f"""
import jax, jax.numpy as jnp, ml_collections
from effdet_jax import compilation_cache
cfg = ml_collections.ConfigDict(dict(compilation_cache=dict(
  dir={str(tmp_path / 'cache')!r}, min_compile_time_s=0.0)))
assert compilation_cache.enable(cfg)
f = jax.jit(lambda x: jnp.sin(x) @ x.T)
print(float(f(jnp.ones((64, 64))).sum()))
"""
  env = {'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'}
  run = lambda: subprocess.run(  # noqa: E731
    [sys.executable, '-c', script],
    capture_output=True,
    text=True,
    env=env,
    check=True,
  )
  first = run()
  files = list((tmp_path / 'cache').iterdir())
  assert files, first.stderr
  second = run()
  assert second.stdout == first.stdout
  assert sorted((tmp_path / 'cache').iterdir()) == sorted(files)


@pytest.mark.slow
def test_train_step_builds_without_tensorflow():
  """GPU/TPU images often have JAX but no TensorFlow: the benchmark's train
  mode (the Trainer and its jitted step) must not import it; only the
  training loop's writers (clu) and the input pipeline do."""
  script = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'clu'):
      raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, 'tests')
import tempfile
import jax
from train_utils import tiny_config
from effdet_jax.tools import benchmark
from effdet_jax.train import trainer
config = tiny_config(batch_size=2)
config.train.num_steps, config.mesh.data = 1000, 1  # the benchmark's step
tr = trainer.Trainer(config, tempfile.mkdtemp(), jax.devices()[:1])
b = benchmark._random_batch(2, tuple(config.model.image_size), 3)
b = jax.device_put(b, tr.batch_sharding(b))
state, metrics = tr.step_fn(b)(tr.fresh_state(), b)
print('loss', float(metrics['loss']))
"""
  out = subprocess.run(
    [sys.executable, '-c', script],
    capture_output=True,
    text=True,
    check=False,
    env={
      'JAX_PLATFORMS': 'cpu',
      'PATH': '/usr/bin:/bin',
      # The tests' shared compilation cache: the same tiny step as above.
      **{
        k: os.environ[k]
        for k in ('JAX_COMPILATION_CACHE_DIR', 'XLA_FLAGS')
        if k in os.environ
      },
    },
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert np.isfinite(float(out.stdout.split('loss')[-1]))


def test_suite_workloads_are_parsed_and_checked():
  sys.path.insert(0, 'benchmarks')
  import suite  # noqa: PLC0415

  assert suite.parse_workloads('forward:1:float32, train:8:bfloat16') == [
    ('forward', 1, 'float32'),
    ('train', 8, 'bfloat16'),
  ]
  for bad in ('forward:1', 'fwd:1:float32', 'train:8:float16'):
    with pytest.raises(ValueError, match='workload'):
      suite.parse_workloads(bad)
