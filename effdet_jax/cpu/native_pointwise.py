"""A 1x1 conv with the BN + activation after it, as XLA:CPU custom calls.

`pointwise_cpu.cc`, for few input channels (EfficientNet's expand layers
at high resolution), where XLA:CPU runs a slow small-K dot and then more
passes over its output, the largest tensor of the network:

* inference, `pointwise_affine_act`: `act((x @ w) * scale + shift)` in
  one pass that writes the output once (its VJP is the jnp form's);
* training, `pointwise_bn_act_train`: `act(BN(x @ w))` with batch
  statistics, summed as the product is written; its backward recomputes
  BN's input gradient per group of rows and contracts it at once into
  both gradients of the product, so that gradient is never written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from effdet_jax.cpu import library as cpu_library

MAX_IN = 64  # pointwise_cpu.cc kMaxIn
MAX_IN_AFFINE = 512  # pointwise_cpu.cc kMaxInAffine (`pointwise_affine_act`)


def supports(
  dtype,
  in_channels: int,
  out_channels: int,
  act,
  any_width: bool = False,
  max_in: int = MAX_IN,
) -> bool:
  """f32, K <= `max_in` (64; `MAX_IN_AFFINE` for `pointwise_affine_act`
  alone), N a multiple of 16 (any N with `any_width`: the inference
  `pointwise_affine_act` pads the weights' columns), a known activation,
  kernels on."""
  return (
    jnp.dtype(dtype) == jnp.float32
    and in_channels <= min(max_in, MAX_IN_AFFINE)
    and (out_channels % 16 == 0 or any_width)
    and cpu_library.act_code(act) is not None
    and cpu_library.enabled()
  )


def _unfused(x, w, scale, shift, act):
  z = jnp.einsum('...c,cd->...d', x, w) * scale + shift
  return z if act is None else act(z)


def _padded_epilogue(w, scale, shift):
  """(w, scale, shift) with the output channels zero-padded to a multiple
  of 16: the kernels compute whole 16-channel blocks and leave the
  padding's lanes unstored."""
  pad = -w.shape[1] % 16
  return (
    jnp.pad(w, ((0, 0), (0, pad))),
    jnp.pad(scale.astype(jnp.float32), (0, pad)),
    jnp.pad(shift.astype(jnp.float32), (0, pad)),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def pointwise_affine_act(x, w, scale, shift, act):
  """`act((x @ w) * scale + shift)` over x's last axis, f32, one pass.

  Any output width: the kernel computes whole blocks of 16 channels, so
  the weights' columns are zero-padded to a multiple of 16 and it leaves
  the padding's lanes unstored (the class predict's 9 x 90 = 810)."""
  rows, n = int(np.prod(x.shape[:-1])), w.shape[1]
  y = cpu_library.call(
    'EffdetPointwiseAffineAct',
    jax.ShapeDtypeStruct((rows, n), jnp.float32),
    x.reshape(rows, x.shape[-1]),
    *_padded_epilogue(w, scale, shift),
    act=np.int64(cpu_library.act_code(act)),
  )
  return y.reshape(*x.shape[:-1], n)


def im2col_affine_act(xp, w, scale, shift, act, window, out_size):
  """`act(conv(xp, w) * scale + shift)` for a k x k conv over few channels
  (the stem), from the padded input `xp` [B, H, W, C]: `window` = (kh, kw,
  stride), `out_size` = (H', W'); `w` [kh*kw*C, N] tap-major,
  channel-minor (`layers.conv_im2col`'s order). The patches are gathered
  per group of output pixels in the kernel, never written out. No VJP of
  its own: the caller's (`layers.conv_im2col`) is the jnp form's."""
  kh, kw, stride = window
  return cpu_library.call(
    'EffdetIm2colAffineAct',
    jax.ShapeDtypeStruct((xp.shape[0], *out_size, w.shape[1]), jnp.float32),
    xp,
    *_padded_epilogue(w, scale, shift),
    act=np.int64(cpu_library.act_code(act)),
    kh=np.int64(kh),
    kw=np.int64(kw),
    stride=np.int64(stride),
  )


def _fwd(x, w, scale, shift, act):
  return pointwise_affine_act(x, w, scale, shift, act), (x, w, scale, shift)


def _bwd(act, res, dy):
  return jax.vjp(lambda *a: _unfused(*a, act), *res)[1](dy)


pointwise_affine_act.defvjp(_fwd, _bwd)


def _f32(shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def pointwise_bn_act_train(x, w, scale, bias, epsilon: float, act):
  """(act(BN(x @ w)), batch mean, batch variance), training-mode BN over
  all but the last axis (`models.batch_norm.normalize_act_train` of
  `layers.pointwise(x, w)`, the same function). No gradient flows through
  the returned statistics (they feed the running averages only)."""
  return _bn_fwd(x, w, scale, bias, epsilon, act)[0]


def _bn_fwd(x, w, scale, bias, epsilon, act):
  rows, n = int(np.prod(x.shape[:-1])), w.shape[1]
  y, z, mean, var = cpu_library.call(
    'EffdetPointwiseBnForward',
    (_f32((rows, n)), _f32((rows, n)), _f32((n,)), _f32((n,))),
    x.reshape(rows, x.shape[-1]),
    w,
    scale,
    bias,
    epsilon=np.float32(epsilon),
    act=np.int64(cpu_library.act_code(act)),
  )
  rstd = lax.rsqrt(var + epsilon)
  out = (z.reshape(*x.shape[:-1], n), mean, var)
  return out, (x, w, y, mean, rstd, scale, bias)


def _bn_bwd(epsilon, act, res, cotangents):
  del epsilon
  x, w, y, mean, rstd, scale, bias = res
  rows, n = y.shape
  dx, dw, dscale, dbias = cpu_library.call(
    'EffdetPointwiseBnBackward',
    (_f32((rows, x.shape[-1])), _f32(w.shape), _f32((n,)), _f32((n,))),
    x.reshape(rows, x.shape[-1]),
    w,
    y,
    cotangents[0].reshape(rows, n),
    scale,
    bias,
    mean,
    rstd,
    act=np.int64(cpu_library.act_code(act)),
  )
  return dx.reshape(x.shape), dw, dscale, dbias


pointwise_bn_act_train.defvjp(_bn_fwd, _bn_bwd)
