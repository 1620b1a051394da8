"""Kernel gradients `x^T dy` over very many rows, as XLA:CPU custom calls.

`weight_grad_cpu.cc`: at EfficientNet's high resolutions a 1x1 conv's
kernel gradient contracts 10^5-10^6 rows into a [C, D] of a few hundred
values, which XLA:CPU's dot ran at about a third of the memory bandwidth.
The kernel reads each row once and keeps the sums in registers:

* `weight_grad(a, b)`: `einsum('bnc,bnd->bcd', a, b)` (one kernel per
  image: the squeeze-excitation gate is folded into the projection's
  kernel per image);
* `im2col_weight_grad(xp, dy, window)`: the stem's kernel gradient, its
  patches read from the padded image, never written out.

Sums in f32 over blocks of rows, then in double over fixed chunks:
deterministic, and at least as precise as the dot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from effdet_jax.cpu import library as cpu_library

# Where the kernel beats XLA's dot (tools: benchmarks/kernels.py's weight
# gradient rows): many rows per output value. Below these the dot is
# already fast (the 32x32 levels: under a millisecond).
MIN_ROWS = 16384
MAX_CHANNELS = 256
# weight_grad_cpu.cc kMaxTile: a patch row (kw * C floats) is one tile.
MAX_PATCH_RUN = 24


def supports(dtype, rows_per_image: int, p: int, q: int) -> bool:
  """f32, many rows per output value, few channels, kernels on."""
  return (
    jnp.dtype(dtype) == jnp.float32
    and rows_per_image >= MIN_ROWS
    and max(p, q) <= MAX_CHANNELS
    and cpu_library.enabled()
  )


def weight_grad(a: jax.Array, b: jax.Array) -> jax.Array:
  """`einsum('bnc,bnd->bcd', a, b)` for f32 `a` [B, M, C], `b` [B, M, D]."""
  return cpu_library.call(
    'EffdetWeightGrad',
    jax.ShapeDtypeStruct((a.shape[0], a.shape[2], b.shape[2]), jnp.float32),
    a,
    b,
  )


def supports_im2col(dtype, kw: int, channels: int) -> bool:
  """f32, a patch row that fits one tile, kernels on."""
  return (
    jnp.dtype(dtype) == jnp.float32
    and kw * channels <= MAX_PATCH_RUN
    and cpu_library.enabled()
  )


def im2col_weight_grad(xp, dy, window) -> jax.Array:
  """`patches(xp)^T dy` summed over all pixels: [kh*kw*C, D], tap-major,
  channel-minor (`layers.conv_im2col`'s order). `xp` the padded input
  [B, Hp, Wp, C], `dy` [B, H', W', D], `window` = (kh, kw, stride)."""
  kh, kw, stride = window
  return cpu_library.call(
    'EffdetIm2colWeightGrad',
    jax.ShapeDtypeStruct((kh * kw * xp.shape[-1], dy.shape[-1]), jnp.float32),
    xp,
    dy,
    kh=np.int64(kh),
    kw=np.int64(kw),
    stride=np.int64(stride),
  )
