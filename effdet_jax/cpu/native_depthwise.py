"""Depthwise convolution as a compiled XLA:CPU custom call.

XLA:CPU has no fast grouped convolution. The jnp form in
`effdet_jax.models.layers` (k*k fused shifted multiply-adds) is ~6x faster
than XLA's, but its kernel gradient is k*k separate reductions, each a full
pass over the input and the output gradient (19 % of the D0 train step).
`depthwise_cpu.cc` computes the forward, the input gradient and the kernel
gradient in one pass each.

Built by `cpu_library` on first use. Without a C++ compiler `available()`
is False and the model keeps the jnp form: the two compute the same
function (tests/test_native_kernels.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from effdet_jax.cpu import library as cpu_library
from effdet_jax.cpu import native_pointwise

_TARGETS = {
  'forward': 'EffdetDepthwiseForward',
  'input_grad': 'EffdetDepthwiseInputGrad',
  'kernel_grad': 'EffdetDepthwiseKernelGrad',
}


def available() -> bool:
  """Whether the compiled kernels can run here (CPU backend, built)."""
  return cpu_library.load()


def supports(x_dtype, kernel_size: int, stride: int) -> bool:
  """Whether `depthwise` handles this case (f32, 3x3 or 5x5, stride 1 or
  2 — EfficientNet's — built); other strides take the jnp form."""
  return (
    jnp.dtype(x_dtype) == jnp.float32
    and kernel_size in (3, 5)
    and stride in (1, 2)
    and available()
  )


def _call(target, shape, a, b, stride, pads):
  return cpu_library.call(
    _TARGETS[target],
    jax.ShapeDtypeStruct(shape, jnp.float32),
    a,
    b,
    stride=np.int64(stride),
    pad_top=np.int64(pads[0]),
    pad_left=np.int64(pads[1]),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise(x, kernel, stride: int, pads: tuple[int, int], out_hw):
  """Depthwise conv `[B,H,W,C] x [k,k,C] -> [B,Ho,Wo,C]`, f32.

  `pads` = (top, left) zero padding (the bottom/right follow from the
  output size `out_hw`).
  """
  shape = (x.shape[0], *out_hw, x.shape[3])
  return _call('forward', shape, x, kernel, stride, pads)


def _fwd(x, kernel, stride, pads, out_hw):
  return depthwise(x, kernel, stride, pads, out_hw), (x, kernel)


def _bwd(stride, pads, out_hw, res, dy):
  x, kernel = res
  dx = _call('input_grad', x.shape, dy, kernel, stride, pads)
  dk = _call('kernel_grad', kernel.shape, x, dy, stride, pads)
  return dx, dk


depthwise.defvjp(_fwd, _bwd)


def supports_epilogue(x_dtype, kernel_size: int, stride: int, act) -> bool:
  """Whether `depthwise_affine_act` runs natively for this case."""
  return (
    supports(x_dtype, kernel_size, stride)
    and cpu_library.act_code(act) is not None
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def depthwise_affine_act(x, kernel, scale, shift, stride, pads, out_hw, act):
  """act(depthwise(x) * scale + shift), per channel, in one pass (f32).

  The inference BN + activation after a depthwise layer, applied as the
  kernel stores its outputs: one write and one read of the layer's output
  fewer. Differentiable (through the unfused form), for the rare caller
  that differentiates an inference-mode model.
  """
  shape = (x.shape[0], *out_hw, x.shape[3])
  return _call_epilogue(
    'EffdetDepthwiseForwardAffineAct',
    jax.ShapeDtypeStruct(shape, jnp.float32),
    (x, kernel, scale, shift, stride, pads, act),
  )


def _call_epilogue(target, results, args):
  """A forward with the affine + activation epilogue: `args` = (x, kernel,
  scale, shift, stride, pads, act)."""
  x, kernel, scale, shift, stride, pads, act = args
  return cpu_library.call(
    target,
    results,
    x,
    kernel,
    scale.astype(jnp.float32),
    shift.astype(jnp.float32),
    stride=np.int64(stride),
    pad_top=np.int64(pads[0]),
    pad_left=np.int64(pads[1]),
    act=np.int64(cpu_library.act_code(act)),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def depthwise_affine_act_pooled(
  x, kernel, scale, shift, stride, pads, out_hw, act
):
  """`depthwise_affine_act` and its output's mean over each image `[B, C]`
  (squeeze-excitation's squeeze, inference), summed per output row as the
  kernel writes it: the separate reduction's read of the output is gone."""
  shape = (x.shape[0], *out_hw, x.shape[3])
  return _call_epilogue(
    'EffdetDepthwiseForwardAffineActPooled',
    (
      jax.ShapeDtypeStruct(shape, jnp.float32),
      jax.ShapeDtypeStruct((x.shape[0], x.shape[3]), jnp.float32),
    ),
    (x, kernel, scale, shift, stride, pads, act),
  )


def _unfused_pooled(x, kernel, scale, shift, stride, pads, out_hw, act):
  y = _unfused(x, kernel, scale, shift, stride, pads, out_hw, act)
  return y, jnp.mean(y, axis=(1, 2))


def _pooled_fwd(x, kernel, scale, shift, stride, pads, out_hw, act):
  out = depthwise_affine_act_pooled(
    x, kernel, scale, shift, stride, pads, out_hw, act
  )
  return out, (x, kernel, scale, shift)


def _pooled_bwd(stride, pads, out_hw, act, res, cotangents):
  f = lambda *a: _unfused_pooled(*a, stride, pads, out_hw, act)  # noqa: E731
  return jax.vjp(f, *res)[1](cotangents)


depthwise_affine_act_pooled.defvjp(_pooled_fwd, _pooled_bwd)


def _unfused(x, kernel, scale, shift, stride, pads, out_hw, act):
  z = depthwise(x, kernel, stride, pads, out_hw) * scale + shift
  return z if act is None else act(z)


def _epi_fwd(x, kernel, scale, shift, stride, pads, out_hw, act):
  y = depthwise_affine_act(x, kernel, scale, shift, stride, pads, out_hw, act)
  return y, (x, kernel, scale, shift)


def _epi_bwd(stride, pads, out_hw, act, res, dy):
  f = lambda *a: _unfused(*a, stride, pads, out_hw, act)  # noqa: E731
  return jax.vjp(f, *res)[1](dy)


depthwise_affine_act.defvjp(_epi_fwd, _epi_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def expand_depthwise_affine_act(
  x,
  w,
  e_scale,
  e_shift,
  kernel,
  scale,
  shift,
  stride,
  pads,
  out_hw,
  act,
  pooled,
):
  """An MBConv block's expand and depthwise layers with their inference BN
  and activation, `act(depthwise(act(x @ w * e_scale + e_shift)) * scale +
  shift)` (f32), in one kernel: the expanded rows are computed into a ring
  of k rows as the depthwise loop needs them, so the expanded tensor is
  never written. `pooled`: returns (y, y's mean over each image `[B, C]`).
  Differentiable through the unfused form."""
  c = w.shape[1]
  y = jax.ShapeDtypeStruct((x.shape[0], *out_hw, c), jnp.float32)
  results = (y, jax.ShapeDtypeStruct((x.shape[0], c), jnp.float32))
  return cpu_library.call(
    'EffdetExpandDepthwiseAffineActPooled'
    if pooled
    else 'EffdetExpandDepthwiseAffineAct',
    results if pooled else y,
    x,
    *native_pointwise._padded_epilogue(w, e_scale, e_shift),
    kernel,
    scale.astype(jnp.float32),
    shift.astype(jnp.float32),
    stride=np.int64(stride),
    pad_top=np.int64(pads[0]),
    pad_left=np.int64(pads[1]),
    act=np.int64(cpu_library.act_code(act)),
  )


def _unfused_expand(
  x,
  w,
  e_scale,
  e_shift,
  kernel,
  scale,
  shift,
  stride,
  pads,
  out_hw,
  act,
  pooled,
):
  z = native_pointwise._unfused(x, w, e_scale, e_shift, act)
  args = (z, kernel, scale, shift, stride, pads, out_hw, act)
  return _unfused_pooled(*args) if pooled else _unfused(*args)


def _expand_fwd(*args):
  return expand_depthwise_affine_act(*args), args[:7]


def _expand_bwd(stride, pads, out_hw, act, pooled, res, cotangents):
  f = lambda *a: _unfused_expand(*a, stride, pads, out_hw, act, pooled)  # noqa: E731
  return jax.vjp(f, *res)[1](cotangents)


expand_depthwise_affine_act.defvjp(_expand_fwd, _expand_bwd)
