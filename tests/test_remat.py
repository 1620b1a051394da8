"""Gradient checkpointing (`train.remat`, `train.remat_policy`): every
policy computes the gradients of the model without it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import tiny_config

from effdet_jax import api
from effdet_jax.models import layers


def _grads(remat, policy='nothing_saveable'):
  cfg = tiny_config().model
  model = api.build_model(cfg, remat=remat, remat_policy=policy)
  variables = api.init_variables(model, jax.random.PRNGKey(0))
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))

  def loss(params):
    (cls, box), _ = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    return sum(jnp.sum(jnp.sin(c)) for c in cls) + sum(
      jnp.sum(b**2) for b in box
    )

  return jax.jit(jax.grad(loss))(variables['params'])


def test_every_policy_gives_the_plain_gradients():
  plain = jax.tree.leaves(_grads(False))
  # Float summation order differs: a tolerance relative to the largest
  # gradient (some leaves' true gradient is ~0, their values f32 noise).
  scale = max(float(np.abs(b).max()) for b in plain)
  # everything_saveable keeps every value: nothing to recompute or check.
  for policy in ('nothing_saveable', 'dots_saveable'):
    assert policy in layers.REMAT_POLICIES
    got = jax.tree.leaves(_grads(True, policy))
    for a, b in zip(got, plain, strict=True):
      np.testing.assert_allclose(a, b, atol=1e-5 * scale, err_msg=policy)


def test_unknown_policy_is_named():
  with pytest.raises(ValueError, match='dots_saveable'):
    layers.rematerialized(layers.Conv, 'dots')
