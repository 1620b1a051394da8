"""The test that matters most: equality with the official google/automl code.

`shared/oracle/official-d0-256/` holds a checkpoint written by the official
TF2 code (random weights; EMA shadows differ from the raw weights) and the
official outputs for `input.npy`. We convert it with the real CLI, open it
with `effdet_jax.load`, and compare every level within
1e-4 * max(1, max|official|).
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

import effdet_jax
from effdet_jax import ops


def _convert(oracle_dir, out, *flags):
  subprocess.run(
    [
      sys.executable,
      '-m',
      'effdet_jax.convert',
      '--source=tf',
      f'--input={oracle_dir / "tf1_ckpt"}',
      '--config=configs/d0.py',
      f'--output={out}',
      *flags,
    ],
    check=True,
    cwd=REPO,
    capture_output=True,
  )
  return out


@pytest.fixture(scope='module', params=[True, False], ids=['ema', 'raw'])
def converted(request, oracle_dir, tmp_path_factory):
  """The oracle checkpoint converted with the real CLI (EMA or raw weights)
  and the official outputs for it."""
  ema = request.param
  out = _convert(
    oracle_dir, tmp_path_factory.mktemp('d0'), f'--ema={str(ema).lower()}'
  )
  outputs = 'outputs.npz' if ema else 'outputs_raw.npz'
  return out, np.load(oracle_dir / outputs)


@pytest.mark.parametrize('backend', ['xla', 'cpu'])
@pytest.mark.slow
def test_official_d0_parity(oracle_dir, converted, backend):
  """Both backends by themselves: the plain forms ('xla', what TPUs and
  GPUs run) and the CPU package's kernels and fusions."""
  out, ref = converted
  x = np.load(oracle_dir / 'input.npy')
  with ops.use_backend(backend):
    model, variables = effdet_jax.load(str(out))
    cls, box = jax.jit(model.apply)(variables, x)
  for i, level in enumerate(range(3, 8)):
    for name, ours in (('cls', cls[i]), ('box', box[i])):
      theirs = ref[f'{name}_l{level}']
      assert ours.shape == theirs.shape
      tol = 1e-4 * max(1.0, float(np.abs(theirs).max()))
      diff = float(np.abs(np.asarray(ours) - theirs).max())
      assert diff <= tol, f'{name}_l{level}: max|diff| {diff} > {tol}'


def test_ema_and_raw_weights_differ(oracle_dir):
  # Guards the test above: reading the wrong copy would be caught.
  a = np.load(oracle_dir / 'outputs.npz')['cls_l3']
  b = np.load(oracle_dir / 'outputs_raw.npz')['cls_l3']
  assert np.abs(a - b).max() > 1e-2


@pytest.mark.slow
def test_other_model_checkpoint_fails_with_names(oracle_dir):
  from effdet_jax.convert import ConversionError, convert

  cfg = effdet_jax.model_config('efficientdet-d1')
  with pytest.raises(ConversionError) as err:
    convert('tf', str(oracle_dir / 'tf1_ckpt'), cfg)
  msg = str(err.value)
  assert 'efficientnet-b1/' in msg  # the first missing names are listed
  assert 'shape mismatches' in msg or 'without a source' in msg


@pytest.mark.slow
def test_checkpoint_without_ema_needs_flag(oracle_dir, tmp_path):
  import tensorflow as tf

  from effdet_jax.convert.strict_fill import ConversionError
  from effdet_jax.convert.tf_checkpoint import convert_tf_checkpoint

  reader = tf.train.load_checkpoint(str(oracle_dir / 'tf1_ckpt'))
  names = [
    n
    for n in reader.get_variable_to_shape_map()
    if not n.endswith('ExponentialMovingAverage')
  ]
  prefix = str(tmp_path / 'raw' / 'model')
  with tf.Graph().as_default():  # a name-based (TF1) checkpoint, raw only
    tf_vars = [
      tf.compat.v1.Variable(reader.get_tensor(n), name=n) for n in names
    ]
    saver = tf.compat.v1.train.Saver(tf_vars)
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      saver.save(sess, prefix)
  model = effdet_jax.build_model(effdet_jax.model_config('efficientdet-d0'))
  abstract = effdet_jax.api.abstract_variables(model)
  with pytest.raises(ConversionError, match='--ema=false'):
    convert_tf_checkpoint(prefix, abstract, 'efficientnet-b0', ema=True)
  raw = convert_tf_checkpoint(prefix, abstract, 'efficientnet-b0', ema=False)
  np.testing.assert_array_equal(
    raw['params']['class_net']['class-predict']['bias'],
    reader.get_tensor('class_net/class-predict/bias'),
  )


def _max_rel_diff(outputs, ref) -> float:
  """max over levels of max|ours - official| / max(1, max|official|)."""
  cls, box = outputs
  worst = 0.0
  for i, level in enumerate(range(3, 8)):
    for name, ours in (('cls', cls[i]), ('box', box[i])):
      theirs = ref[f'{name}_l{level}']
      assert ours.dtype == jnp.float32  # bf16 compute still returns f32
      diff = float(np.abs(np.asarray(ours) - theirs).max())
      worst = max(worst, diff / max(1.0, float(np.abs(theirs).max())))
  return worst


@pytest.mark.slow
def test_converted_computes_in_float32_unless_asked(oracle_dir, tmp_path):
  """configs/d6, d7 and d7x train in bfloat16; the converter records the
  weights, not that recipe: a bf16 config converts to a model that
  computes in f32 (official outputs within 1e-4). bf16 only when asked, by
  the converter's --dtype or load(dtype=); its own tolerance is 2e-2
  relative (bf16 keeps 8 mantissa bits: 0.7% here, ~0.5% on
  D7x in issue 25)."""
  recipe = '--config.model.dtype=bfloat16'
  plain = _convert(oracle_dir, tmp_path / 'f32', recipe)
  asked = _convert(oracle_dir, tmp_path / 'bf16', recipe, '--dtype=bfloat16')
  for out, want in ((plain, 'float32'), (asked, 'bfloat16')):
    assert json.loads((out / 'model_config.json').read_text())['dtype'] == want
    assert json.loads((out / 'conversion.json').read_text())['dtype'] == want
  with pytest.raises(ValueError, match='unknown dtype'):
    effdet_jax.load(str(plain), dtype='float64')

  x = np.load(oracle_dir / 'input.npy')
  ref = np.load(oracle_dir / 'outputs.npz')
  diffs = {}
  for out, dtype, want in (
    (plain, None, jnp.float32),
    (plain, 'bfloat16', jnp.bfloat16),
    (asked, None, jnp.bfloat16),
    (asked, 'float32', jnp.float32),
  ):
    loaded = effdet_jax.load(str(out), dtype=dtype)
    model, variables = loaded
    assert model.dtype == want and loaded.config.dtype == jnp.dtype(want).name
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    diffs[out.name, dtype] = _max_rel_diff(
      jax.jit(model.apply)(variables, x), ref
    )
  assert diffs['f32', None] <= 1e-4 and diffs['bf16', 'float32'] <= 1e-4
  # bf16 is really used (far above the f32 agreement), within its tolerance.
  for key in (('f32', 'bfloat16'), ('bf16', None)):
    assert 1e-3 < diffs[key] <= 2e-2, (key, diffs[key])
