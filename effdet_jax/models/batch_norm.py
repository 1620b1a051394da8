"""Keras BatchNorm (official `utils.BatchNormalization`), then an activation.

Same variables and arithmetic as `flax.linen.BatchNorm` (params `scale`,
`bias`; batch_stats `mean`, `var`; fast variance E[x^2] - E[x]^2; running
averages `m * old + (1 - m) * batch`), so checkpoints and the official name
map are unchanged. The activation that follows a BN is an attribute, so
that normalisation and activation are one named operation in training
(`batch_norm_train`), which a backend may compute in one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from effdet_jax import ops
from effdet_jax.models import initializers

Array = jax.Array
Activation = Callable[[Array], Array] | None


def moments(x: Array) -> tuple[Array, Array]:
  """Per-channel mean and (fast) variance over all but the last axis, f32."""
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=axes)
  mean2 = jnp.mean(xf * xf, axis=axes)
  return mean, jnp.maximum(mean2 - mean * mean, 0.0)


@ops.backend_form('batch_norm_train')
def batch_norm_train(
  x: Array, scale: Array, bias: Array, epsilon: float, act: Activation
) -> tuple[Array, Array, Array]:
  """act(BN(x)) with batch statistics; returns (y, batch mean, batch var).

  `y` has x's dtype; statistics and arithmetic are float32. The statistics
  are for the running averages (the caller stops their gradient).
  """
  mean, var = moments(x)
  z = (x.astype(jnp.float32) - mean) * (lax.rsqrt(var + epsilon) * scale)
  z = z + bias
  y = z if act is None else act(z)
  return y.astype(x.dtype), mean, var


class BatchNorm(nn.Module):
  """Keras-equivalent BatchNorm (f32 parameters and statistics) + act.

  Attributes:
    use_running_average: inference mode (moving statistics).
    momentum: moving-average momentum (Keras 0.99).
    epsilon: variance epsilon (Keras 1e-3).
    dtype: output dtype.
    act: activation applied to the normalised output, or None.
  """

  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-3
  dtype: Any = jnp.float32
  act: Activation = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param('scale', initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable(
      'batch_stats', 'mean', initializers.zeros, None, (c,), jnp.float32
    )
    ra_var = self.variable(
      'batch_stats', 'var', initializers.ones, None, (c,), jnp.float32
    )
    x = x.astype(self.dtype)
    if self.use_running_average:
      mul = lax.rsqrt(ra_var.value + self.epsilon) * scale
      z = (x.astype(jnp.float32) - ra_mean.value) * mul + bias
      return (z if self.act is None else self.act(z)).astype(self.dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.act)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * lax.stop_gradient(mean)
      ra_var.value = m * ra_var.value + (1 - m) * lax.stop_gradient(var)
    return y
