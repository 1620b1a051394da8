"""Keras BatchNorm with the following activation fused into its gradient.

Same variables and arithmetic as `flax.linen.BatchNorm` (params `scale`,
`bias`; batch_stats `mean`, `var`; fast variance E[x^2] - E[x]^2; running
averages `m * old + (1 - m) * batch`), so checkpoints and the official
name map are unchanged. The difference is in training mode: normalisation
and the activation after it are one function with a hand-written
gradient. Autodiff of BN -> swish keeps x - mean, the normalised value
and the sigmoid as residuals (three full-size tensors written per layer,
plus their reads); here the only residual is the layer input, and the
backward pass recomputes the rest inside its two fused loops (one
reduction over x and dy for d(scale), d(bias); one elementwise pass for
dx). On XLA:CPU, where EfficientNet's step is bound by memory traffic,
that is the largest single cost of the training step (measured by
profiling the step). On one CPU device, in f32, both directions are
compiled custom calls (`effdet_jax.kernels.native_batch_norm`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from effdet_jax.cpu import native_batch_norm
from effdet_jax.models import initializers
from effdet_jax.models.batch_norm import moments

Array = jax.Array
Activation = Callable[[Array], Array] | None


def _apply(act: Activation, z: Array) -> Array:
  return z if act is None else act(z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize_act_train(
  x: Array, scale: Array, bias: Array, epsilon: float, act: Activation
) -> tuple[Array, Array, Array]:
  """act(BN(x)) with batch statistics; returns (y, batch mean, batch var).

  `y` has x's dtype; statistics and arithmetic are float32. The returned
  statistics are for the running averages only: no gradient flows back
  through them (callers pass them through `stop_gradient`).
  """
  return _fwd(x, scale, bias, epsilon, act)[0]


def _fwd(x, scale, bias, epsilon, act):
  if native_batch_norm.supports(x.dtype, act):
    y, mean, var = native_batch_norm.forward(x, scale, bias, epsilon, act)
    rstd = lax.rsqrt(var + epsilon)
  else:
    mean, var = moments(x)
    rstd = lax.rsqrt(var + epsilon)
    z = (x.astype(jnp.float32) - mean) * (rstd * scale) + bias
    y = _apply(act, z).astype(x.dtype)
  return (y, mean, var), (x, mean, rstd, scale, bias)


def _bwd(epsilon, act, res, cotangents):
  del epsilon
  x, mean, rstd, scale, bias = res
  if native_batch_norm.supports(x.dtype, act):
    return native_batch_norm.backward(
      x, cotangents[0], scale, bias, mean, rstd, act
    )
  dy = cotangents[0].astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * rstd
  if act is None:
    dz = dy
  else:
    _, act_vjp = jax.vjp(act, xhat * scale + bias)
    (dz,) = act_vjp(dy)
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  dbias = jnp.sum(dz, axis=axes)
  dscale = jnp.sum(dz * xhat, axis=axes)
  dx = (scale * rstd) * (dz - dbias / n - xhat * (dscale / n))
  return dx.astype(x.dtype), dscale, dbias


normalize_act_train.defvjp(_fwd, _bwd)


def _pool(y: Array) -> Array:
  """Mean over each image's pixels, f32: [B, ..., C] -> [B, C]."""
  return jnp.mean(y.astype(jnp.float32), axis=tuple(range(1, y.ndim - 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize_act_train_pooled(
  x: Array, scale: Array, bias: Array, epsilon: float, act: Activation
) -> tuple[Array, Array, Array, Array]:
  """`normalize_act_train`'s (y, batch mean, batch var) and `y`'s mean
  over each image's pixels `[B, C]` (squeeze-excitation's squeeze).

  Only with the CPU kernels (`native_batch_norm.supports`): the kernel
  sums the pooled mean as it writes y, and its backward adds the pooled
  mean's gradient to dy as it reads it, where XLA read y once more for
  the mean and wrote the sum of the two gradients (D0 b8: ~35 ms of the
  train step). Elsewhere `BatchNorm` pools y in jnp.
  """
  return _pooled_fwd(x, scale, bias, epsilon, act)[0]


def _pooled_fwd(x, scale, bias, epsilon, act):
  y, mean, var, pooled = native_batch_norm.forward_pooled(
    x, scale, bias, epsilon, act
  )
  rstd = lax.rsqrt(var + epsilon)
  return (y, mean, var, pooled), (x, mean, rstd, scale, bias)


def _pooled_bwd(epsilon, act, res, cotangents):
  del epsilon
  x, mean, rstd, scale, bias = res
  dy, _, _, dpooled = cotangents
  return native_batch_norm.backward_pooled(
    x, dy, dpooled, scale, bias, mean, rstd, act
  )


normalize_act_train_pooled.defvjp(_pooled_fwd, _pooled_bwd)


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
  def __call__(
    self,
    x: Array,
    affine_only: bool = False,
    fused: Callable[..., tuple[Array, Array, Array]] | None = None,
    pooled: bool = False,
  ) -> Array | tuple[Array, Array]:
    """act(BN(x)); with `affine_only` (inference mode), instead the
    per-channel (multiplier, shift) that BN(x) = x * multiplier + shift,
    for a producer that applies them itself.

    `fused` (training mode): `fused(scale, bias, epsilon, act)` returns
    (act(BN(input)), batch mean, batch variance) for an input its producer
    computes itself (`layers.Conv(..., bn=)`); `x` gives only the feature
    count then.

    `pooled`: returns (y, y's f32 mean over each image's pixels `[B, C]`),
    squeeze-excitation's squeeze; in training with the CPU kernels it is
    summed as y is written (`normalize_act_train_pooled`).
    """
    c = x.shape[-1]
    scale = self.param('scale', initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable(
      'batch_stats', 'mean', initializers.zeros, None, (c,), jnp.float32
    )
    ra_var = self.variable(
      'batch_stats', 'var', initializers.ones, None, (c,), jnp.float32
    )
    if affine_only:
      if not self.use_running_average:
        raise ValueError('BatchNorm affine_only needs use_running_average')
      mul = lax.rsqrt(ra_var.value + self.epsilon) * scale
      return mul, bias - ra_mean.value * mul
    x = x.astype(self.dtype)
    if self.use_running_average:
      mul = lax.rsqrt(ra_var.value + self.epsilon) * scale
      z = (x.astype(jnp.float32) - ra_mean.value) * mul + bias
      y = _apply(self.act, z).astype(self.dtype)
      return (y, _pool(y)) if pooled else y
    pool = None
    if fused is not None:
      y, mean, var = fused(scale, bias, self.epsilon, self.act)
    elif (
      pooled and x.ndim >= 3 and native_batch_norm.supports(x.dtype, self.act)
    ):
      y, mean, var, pool = normalize_act_train_pooled(
        x, scale, bias, self.epsilon, self.act
      )
    else:
      y, mean, var = normalize_act_train(x, scale, bias, self.epsilon, self.act)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * lax.stop_gradient(mean)
      ra_var.value = m * ra_var.value + (1 - m) * lax.stop_gradient(var)
    if not pooled:
      return y
    return y, (_pool(y) if pool is None else pool)
