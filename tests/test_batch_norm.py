"""The fused BatchNorm(+activation) equals flax's BatchNorm followed by the
activation: outputs, gradients, running statistics and variable names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effdet_jax import ops
from effdet_jax.models import layers
from effdet_jax.models.batch_norm import BatchNorm


class _Flax(nn.Module):
  act: object
  train: bool

  @nn.compact
  def __call__(self, x):
    y = nn.BatchNorm(
      use_running_average=not self.train, momentum=0.99, epsilon=1e-3
    )(x)
    return y if self.act is None else self.act(y)


class _Ours(nn.Module):
  act: object
  train: bool

  @nn.compact
  def __call__(self, x):
    return BatchNorm(not self.train, act=self.act)(x)


def _vars(seed, c):
  rng = np.random.default_rng(seed)
  return {
    'params': {
      'BatchNorm_0': {
        'scale': jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
        'bias': jnp.asarray(rng.normal(size=c), jnp.float32),
      }
    },
    'batch_stats': {
      'BatchNorm_0': {
        'mean': jnp.asarray(rng.normal(size=c), jnp.float32),
        'var': jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
      }
    },
  }


@pytest.mark.parametrize('backend', ['xla', 'cpu'])
@pytest.mark.parametrize('act', [layers.swish, jax.nn.relu, None])
@pytest.mark.parametrize('train', [True, False])
def test_matches_flax_batchnorm_then_act(act, train, backend):
  """Both backends' forms: the plain one (what TPUs run) and the CPU
  package's fused one (`effdet_jax.cpu.batch_norm`)."""
  with ops.use_backend(backend):
    _check_matches_flax(act, train)


def _check_matches_flax(act, train):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(2.0, 3.0, (3, 5, 7, 6)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  variables = _vars(1, 6)

  def run(module):
    def f(params, x):
      y, upd = module.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        x,
        mutable=['batch_stats'],
      )
      return y, upd

    (y, upd), vjp = jax.vjp(f, variables['params'], x, has_aux=False)[:2]
    return y, upd, vjp((dy, jax.tree.map(jnp.zeros_like, upd)))

  y0, s0, (gp0, gx0) = run(_Flax(act, train))
  y1, s1, (gp1, gx1) = run(_Ours(act, train))
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx1, gx0, rtol=1e-4, atol=1e-5)
  for k in ('scale', 'bias'):
    np.testing.assert_allclose(
      gp1['BatchNorm_0'][k], gp0['BatchNorm_0'][k], rtol=1e-4, atol=1e-5
    )
  for k in ('mean', 'var'):
    np.testing.assert_allclose(
      s1['batch_stats']['BatchNorm_0'][k],
      s0['batch_stats']['BatchNorm_0'][k],
      rtol=1e-6,
      atol=1e-6,
    )
  if train:  # the running statistics moved (Keras momentum 0.99)
    assert not np.allclose(
      s1['batch_stats']['BatchNorm_0']['mean'],
      variables['batch_stats']['BatchNorm_0']['mean'],
    )


def test_variables_are_flax_batchnorms():
  x = jnp.ones((2, 4, 4, 5))
  a = _Flax(None, True).init(jax.random.PRNGKey(0), x)
  b = _Ours(layers.swish, True).init(jax.random.PRNGKey(0), x)
  shapes = lambda t: jax.tree.map(lambda v: (v.shape, v.dtype), t)
  assert shapes(a) == shapes(b)
  np.testing.assert_array_equal(
    b['batch_stats']['BatchNorm_0']['var'], np.ones(5)
  )


def test_bfloat16_output_dtype_and_value():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4, 6, 6, 8)), jnp.float32)
  variables = {k: v['BatchNorm_0'] for k, v in _vars(3, 8).items()}
  y32, _ = BatchNorm(False, act=layers.swish).apply(
    variables, x, mutable=['batch_stats']
  )
  y16, _ = BatchNorm(False, dtype=jnp.bfloat16, act=layers.swish).apply(
    variables, x.astype(jnp.bfloat16), mutable=['batch_stats']
  )
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(y16, np.float32), y32, rtol=5e-2, atol=5e-2
  )
