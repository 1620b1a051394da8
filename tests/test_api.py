"""Public API: create_model / load / apply, dtypes, train mode, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effdet_jax


@pytest.fixture(scope='module')
def d0_3cls():
  return effdet_jax.create_model('efficientdet-d0', num_classes=3)


@pytest.mark.slow
def test_create_apply_shapes(d0_3cls):
  model, variables = d0_3cls
  x = jnp.zeros((2, 128, 160, 3))
  cls, box = jax.jit(model.apply)(variables, x)
  # Ceil-halving per level (official get_feat_sizes): 160 -> 20,10,5,3,2.
  assert [c.shape for c in cls] == [
    (2, 128 // 2**lvl, -(-160 // 2**lvl), 27) for lvl in range(3, 8)
  ]
  assert [b.shape[-1] for b in box] == [36] * 5
  assert all(c.dtype == jnp.float32 for c in cls + box)


def test_bad_inputs_fail_before_compilation(d0_3cls):
  model, variables = d0_3cls
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
    model.apply(variables, jnp.zeros((1, 128, 128, 1)))
  with pytest.raises(ValueError, match='2\\*\\*max_level = 128'):
    model.apply(variables, jnp.zeros((1, 64, 256, 3)))
  with pytest.raises(ValueError, match='unknown model field'):
    effdet_jax.create_model('efficientdet-d0', num_clases=3)


@pytest.mark.slow
def test_save_load_roundtrip(d0_3cls, tmp_path):
  model, variables = d0_3cls
  cfg = effdet_jax.model_config('efficientdet-d0', num_classes=3)
  effdet_jax.save(str(tmp_path / 'm'), cfg, variables)
  model2, variables2 = effdet_jax.load(str(tmp_path / 'm'))
  assert model2 == model
  for a, b in zip(
    jax.tree.leaves(variables), jax.tree.leaves(variables2), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(FileNotFoundError, match='model_config.json'):
    effdet_jax.load(str(tmp_path))


@pytest.mark.slow
def test_train_mode_updates_bn_statistics(d0_3cls):
  model, variables = d0_3cls
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 128, 128, 3))
  fn = jax.jit(
    lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])
  )
  (cls, _), updates = fn(variables, x)
  old = variables['batch_stats']['backbone']['stem']['tpu_batch_normalization']
  new = updates['batch_stats']['backbone']['stem']['tpu_batch_normalization']
  # Keras momentum 0.99: moving = 0.99 * moving + 0.01 * batch (biased var).
  stem = jax.lax.conv_general_dilated(
    x,
    variables['params']['backbone']['stem']['conv2d']['kernel'],
    (2, 2),
    'SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  batch_mean = np.asarray(stem.mean(axis=(0, 1, 2)))
  np.testing.assert_allclose(
    new['mean'], 0.99 * old['mean'] + 0.01 * batch_mean, atol=1e-5
  )
  # D0 has no drop-connect (b0 backbone, no head survival): deterministic.
  (cls2, _), _ = fn(variables, x)
  np.testing.assert_array_equal(np.asarray(cls[0]), np.asarray(cls2[0]))


@pytest.mark.slow
def test_drop_connect_needs_and_uses_rng():
  model, variables = effdet_jax.create_model(
    'efficientdet-lite0', num_classes=2
  )
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 128, 128, 3))
  fn = jax.jit(
    lambda v, x, r: model.apply(
      v, x, train=True, mutable=['batch_stats'], rngs={'dropout': r}
    )
  )
  (a, _), _ = fn(variables, x, jax.random.PRNGKey(0))
  (b, _), _ = fn(variables, x, jax.random.PRNGKey(1))
  assert np.abs(np.asarray(a[0]) - np.asarray(b[0])).max() > 1e-4


@pytest.mark.slow
def test_bfloat16_compute_keeps_f32_params_and_stats(d0_3cls):
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 128, 128, 3))
  m32, v = d0_3cls
  m16 = effdet_jax.build_model(
    effdet_jax.model_config('efficientdet-d0', num_classes=3, dtype='bfloat16')
  )
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v))
  (c32, _), (c16, _) = jax.jit(m32.apply)(v, x), jax.jit(m16.apply)(v, x)
  for a, b in zip(c32, c16, strict=True):
    assert b.dtype == jnp.float32
    scale = float(np.abs(np.asarray(a)).max())
    assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) < 0.1 * max(
      1.0, scale
    )
