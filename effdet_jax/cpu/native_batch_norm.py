"""Training-mode BatchNorm + activation as compiled XLA:CPU custom calls.

`effdet_jax.models.batch_norm` computes act(BN(x)) with batch statistics
and its gradient in jnp; on XLA:CPU, where the D0 train step is bound by
memory traffic, its reductions and elementwise passes were ~45 % of the
step. `batch_norm_cpu.cc` makes the forward two passes over x (both
statistics, then normalise + activate) and the backward two over (x, dy).
Same function as the jnp form (tests/test_native_kernels.py); statistics
are accumulated in double.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from effdet_jax.cpu import library as cpu_library

act_code = cpu_library.act_code  # shared with the depthwise epilogue


def supports(dtype, act) -> bool:
  """f32, a known activation, and `cpu_library.enabled()`."""
  return (
    jnp.dtype(dtype) == jnp.float32
    and act_code(act) is not None
    and cpu_library.enabled()
  )


def _f32(shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def forward(x, scale, bias, epsilon: float, act):
  """(act(BN(x)), batch mean, batch variance) over all but the last axis."""
  c = x.shape[-1]
  return cpu_library.call(
    'EffdetBatchNormForward',
    (_f32(x.shape), _f32((c,)), _f32((c,))),
    x,
    scale,
    bias,
    epsilon=np.float32(epsilon),
    act=np.int64(act_code(act)),
  )


def backward(x, dy, scale, bias, mean, rstd, act):
  """(dx, dscale, dbias) of `forward`'s output, given its cotangent dy."""
  c = x.shape[-1]
  return cpu_library.call(
    'EffdetBatchNormBackward',
    (_f32(x.shape), _f32((c,)), _f32((c,))),
    x,
    dy,
    scale,
    bias,
    mean,
    rstd,
    act=np.int64(act_code(act)),
  )


def forward_pooled(x, scale, bias, epsilon: float, act):
  """`forward`'s (y, mean, var) and y's mean over each image's pixels
  [B, C] (squeeze-excitation's input), summed as y is written."""
  b, c = x.shape[0], x.shape[-1]
  return cpu_library.call(
    'EffdetBatchNormForwardPooled',
    (_f32(x.shape), _f32((c,)), _f32((c,)), _f32((b, c))),
    x,
    scale,
    bias,
    epsilon=np.float32(epsilon),
    act=np.int64(act_code(act)),
  )


def backward_pooled(x, dy, dpooled, scale, bias, mean, rstd, act):
  """`backward` given also the cotangent of `forward_pooled`'s pooled
  mean: its share of each pixel is added to dy inside the kernel."""
  pixels = x.size // (x.shape[0] * x.shape[-1])
  c = x.shape[-1]
  return cpu_library.call(
    'EffdetBatchNormBackwardPooled',
    (_f32(x.shape), _f32((c,)), _f32((c,))),
    x,
    dy,
    dpooled.astype(jnp.float32) / pixels,
    scale,
    bias,
    mean,
    rstd,
    act=np.int64(act_code(act)),
  )
