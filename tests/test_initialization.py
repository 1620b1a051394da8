"""Host-drawn initial variables (effdet_jax/initialization.py).

The NumPy forms must draw what the JAX initialisers draw: the same
constants exactly, the same distribution (moments, bounds) for the random
leaves, compared with `model.init` compiled on the same tiny model.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import tiny_config

from effdet_jax import api, initialization
from effdet_jax.models import initializers
from effdet_jax.train.trainer import Trainer


def _flat(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(v)
    for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@pytest.fixture(scope='module')
def tiny():
  cfg = tiny_config().model
  cfg.fpn_num_filters = 64  # leaves large enough for their moments
  return api.build_model(cfg)


def test_every_variable_is_drawn_on_the_host():
  for name, remat in (
    ('efficientdet-d0', False),
    ('efficientdet-lite0', False),
    ('efficientdet-d7x', True),  # configs/d7x.py trains with remat
  ):
    model = api.build_model(api.model_config(name), remat=remat)
    _, made = initialization.trace(model)
    missing = [jax.tree_util.keystr(p) for p, i in made.items() if i is None]
    assert len(made) > 500 and not missing, (name, missing[:5])


def test_host_values_match_the_jax_initialisers(tiny):
  key = jax.random.PRNGKey(7)
  host = _flat(initialization.host_variables(tiny, key))
  ref = _flat(jax.jit(lambda k: initialization.init(tiny, k))(key))
  _, made = initialization.trace(tiny)
  inits = {jax.tree_util.keystr(p): i for p, i in made.items()}
  assert host.keys() == ref.keys()
  checked = 0
  for name, value in host.items():
    want, init = ref[name], inits[name]
    assert value.shape == want.shape and value.dtype == want.dtype, name
    if isinstance(init, initializers.Constant):
      np.testing.assert_array_equal(value, want, err_msg=name)
      continue
    assert not np.array_equal(value, want), name  # drawn, not copied
    if value.size < 2000:
      continue
    # Both draws estimate the same std (relative error of an estimate
    # from n samples ~ 1/sqrt(2n): 6 sigma each way).
    tol = 6 / math.sqrt(2 * value.size)
    assert abs(value.std() / want.std() - 1) < 2 * tol, name
    assert abs(value.mean()) < 6 * want.std() / math.sqrt(value.size), name
    # The support: a truncated normal and a uniform have hard bounds.
    # The support: a truncated normal and a uniform have hard bounds, the
    # same for both draws.
    dist = getattr(init, 'distribution', '')
    if dist in ('truncated_normal', 'uniform'):
      sd = math.sqrt(init.variance(value.shape))
      bound = 2 * sd / 0.87962566 if dist == 'truncated_normal' else 3**0.5 * sd
      for x in (value, want):
        assert 0.9 * bound < np.abs(x).max() <= bound * (1 + 1e-5), name
    checked += 1
  assert checked >= 10


def test_theoretical_std_of_each_form():
  rng = np.random.default_rng(0)
  shape = (3, 3, 64, 128)
  fan_in, fan_out = 3 * 3 * 64, 3 * 3 * 128
  cases = [
    (initializers.VarianceScaling(2.0, 'fan_out', 'normal'), 2 / fan_out),
    (
      initializers.VarianceScaling(1.0, 'fan_in', 'truncated_normal'),
      1 / fan_in,
    ),
    (
      initializers.VarianceScaling(1.0, 'fan_avg', 'uniform'),
      2 / (fan_in + fan_out),
    ),
    (initializers.Normal(0.01), 1e-4),
  ]
  for init, variance in cases:
    x = init.numpy(rng, shape, np.float32)
    assert x.dtype == np.float32
    assert abs(x.var() / variance - 1) < 0.02, init


def test_seeded_per_leaf_and_deterministic(tiny):
  a = _flat(initialization.host_variables(tiny, jax.random.PRNGKey(1)))
  b = _flat(initialization.host_variables(tiny, jax.random.PRNGKey(1)))
  c = _flat(initialization.host_variables(tiny, jax.random.PRNGKey(2)))
  typed = _flat(initialization.host_variables(tiny, jax.random.key(1)))
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
    np.testing.assert_array_equal(a[name], typed[name])
  random = [n for n in a if np.ptp(a[n]) > 0]
  assert random and all(not np.array_equal(a[n], c[n]) for n in random)
  # Two leaves of the same shape and initialiser still differ (path seed).
  by_shape = {}
  for n in random:
    by_shape.setdefault((a[n].shape, n.split("'")[-2]), []).append(n)
  pairs = [ns for ns in by_shape.values() if len(ns) > 1]
  assert pairs and not np.array_equal(a[pairs[0][0]], a[pairs[0][1]])


class _Custom(nn.Module):
  """A block with a stock Flax initialiser (no NumPy form)."""

  max_level: int = 2

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(3, kernel_init=nn.initializers.lecun_normal())(x)
    scale = self.param('scale', initializers.ones, (3,), jnp.float32)
    return x * scale


def test_other_initialisers_are_computed_compiled(caplog):
  model = _Custom()
  with caplog.at_level('WARNING'):
    host = initialization.host_variables(model, 0)
  assert 'compiled model.init' in caplog.text and "'kernel'" in caplog.text
  ref = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))
  want = ref['params']['Dense_0']['kernel']
  np.testing.assert_array_equal(host['params']['Dense_0']['kernel'], want)
  np.testing.assert_array_equal(host['params']['Dense_0']['bias'], 0)
  np.testing.assert_array_equal(host['params']['scale'], 1)


def test_fresh_state_is_placed_in_its_shardings():
  config = tiny_config()
  config.mesh.data = 8
  tr = Trainer(config, '/unused', devices=jax.devices()[:8])
  host = tr.host_state()
  state = tr.fresh_state()
  for got, want, sharding in zip(
    jax.tree.leaves(state),
    jax.tree.leaves(host),
    jax.tree.leaves(tr.state_shardings),
    strict=True,
  ):
    assert got.sharding == sharding
    np.testing.assert_array_equal(np.asarray(got), want)
  # Separate buffers for the params and their EMA (the step donates both).
  p, e = jax.tree.leaves(state.params)[0], jax.tree.leaves(state.ema_params)[0]
  for a, b in zip(p.addressable_shards, e.addressable_shards, strict=True):
    assert a.data.unsafe_buffer_pointer() != b.data.unsafe_buffer_pointer()
  assert not any(np.any(x) for x in jax.tree.leaves(host.opt_state))
