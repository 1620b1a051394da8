"""The model's layers in their XLA:CPU forms (the `cpu` backend).

The same functions as `effdet_jax/models/layers.py`, computed the way
XLA:CPU runs fastest: the C++ kernels where they apply (one device, f32),
else jnp forms XLA:CPU fuses well (the shifted-tap depthwise convolution,
im2col for narrow convolutions, the tap max-pool), and the fusions that
need a layer to see the next one (a conv with the BN and activation after
it: `Conv(bn=)`, `Conv(epilogue=)`, `DepthwiseConv(epilogue=, pooled=,
expand=)`, `SeparableConv(bn=)`). `blocks.py` builds the model's blocks
from them with the plain modules' variable names.

`impl` arguments: 'auto' (the kernels where they apply, else 'shift'),
'native', 'shift', or 'lax' (XLA's own forms, for comparison).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from effdet_jax.cpu import library as cpu_library
from effdet_jax.cpu import (
  native_depthwise,
  native_pointwise,
  native_weight_grad,
)
from effdet_jax.cpu.batch_norm import BatchNorm
from effdet_jax.models import initializers
from effdet_jax.models.layers import (
  BN_EPSILON,
  BN_MOMENTUM,
  backbone_conv_init,
  glorot_uniform,
  same_padding,
)

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


def batch_norm(
  train: bool,
  dtype: Dtype,
  name: str,
  act: Callable[[Array], Array] | None = None,
) -> BatchNorm:
  """Keras-equivalent BatchNorm (f32 parameters and statistics), then `act`.

  Passing the activation that follows the BN here (instead of applying
  it to the output) fuses it into the BN's gradient (`batch_norm.py`).
  """
  return BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
    act=act,
    name=name,
  )


# --------------------------------------------------------------------------
# TF "SAME" padding and depthwise convolution.


def _default_depthwise_impl(
  dtype=jnp.float32, k: int = 3, stride: int = 1
) -> str:
  # XLA:CPU lowers grouped convolutions to a slow generic loop. The compiled
  # kernels (effdet_jax/kernels) are fastest there; where they do not apply
  # (bf16, no C++ compiler, a multi-device mesh: a custom call has no
  # sharding rule) the k*k shifted multiply-adds fuse into one vectorised
  # loop (~6x faster than XLA's, see benchmarks/depthwise.py). GPUs/TPUs
  # have good grouped convs.
  if jax.default_backend() != 'cpu':
    return 'lax'
  if cpu_library.enabled() and native_depthwise.supports(dtype, k, stride):
    return 'native'
  return 'shift'


def depthwise_conv(
  x: Array, kernel: Array, stride: int = 1, impl: str = 'auto'
) -> Array:
  """Depthwise convolution with TF SAME padding.

  Args:
    x: `[B, H, W, C]`.
    kernel: `[kh, kw, C, 1]` (TF depthwise layout, depth multiplier 1).
    stride: the same stride for H and W.
    impl: 'shift' (k*k fused shifted multiply-adds), 'lax' (XLA grouped
      convolution), 'native' (compiled XLA:CPU custom call, f32) or 'auto'
      (native or shift on CPU, lax elsewhere). All compute the same
      function; they differ in speed only.

  Returns:
    `[B, ceil(H / stride), ceil(W / stride), C]`.
  """
  kh, kw, channels, mult = kernel.shape
  if mult != 1 or channels != x.shape[-1]:
    raise ValueError(
      f'depthwise kernel {kernel.shape} does not fit input {x.shape}'
    )
  if impl == 'auto':
    impl = _default_depthwise_impl(x.dtype, kh, stride)
  kernel = kernel.astype(x.dtype)
  if impl == 'native':
    if kh != kw or not native_depthwise.supports(x.dtype, kh, stride):
      raise ValueError(
        f'native depthwise kernel cannot run {x.dtype} k={kh} s={stride} '
        f'on {jax.default_backend()}'
      )
    pads, out_hw = _native_window(x.shape, kernel.shape, stride)
    return native_depthwise.depthwise(
      x, kernel[:, :, :, 0], stride, pads, out_hw
    )
  if impl == 'lax':
    return lax.conv_general_dilated(
      x,
      kernel.reshape(kh, kw, 1, channels),
      window_strides=(stride, stride),
      padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=channels,
    )
  if impl != 'shift':
    raise ValueError(f'unknown depthwise impl {impl!r}')
  return _depthwise_shift(x, kernel[:, :, :, 0], stride)


# The name scope of an epilogue's folded inference BN: `tools.flops` counts
# it zero, as the official count does the fused BN op it stands for.
BN_AFFINE_SCOPE = 'bn_affine'


def _affine_act(y: Array, scale, shift, act, dtype) -> Array:
  """`act(y * scale + shift)` in f32, cast to `dtype`: the jnp form of an
  inference BN + activation that a producer applies (the epilogues).
  `scale` None: `act(y + shift)`, a bias add (counted as one)."""
  z = y.astype(jnp.float32)
  if scale is None:
    z = z + shift
  else:
    with jax.named_scope(BN_AFFINE_SCOPE):
      z = z * scale + shift
  return (z if act is None else act(z)).astype(dtype)


def depthwise_conv_affine_act(
  x: Array,
  kernel: Array,
  stride: int,
  scale: Array,
  shift: Array,
  act: Callable[[Array], Array] | None,
  impl: str = 'auto',
  pooled: bool = False,
) -> Array | tuple[Array, Array]:
  """`act(depthwise_conv(x, kernel, stride) * scale + shift)` per channel.

  The inference-mode BN + activation after a depthwise layer. Where the
  depthwise form is the compiled kernel they are applied as it stores its
  outputs (`native_depthwise.depthwise_affine_act`); elsewhere in jnp.
  `pooled`: also returns the output's mean over H, W `[B, C]` (f32; SE's
  squeeze), which the kernel sums as it writes.
  """
  kh = kernel.shape[0]
  if impl == 'auto':
    impl = _default_depthwise_impl(x.dtype, kh, stride)
  if impl == 'native' and native_depthwise.supports_epilogue(
    x.dtype, kh, stride, act
  ):
    pads, out_hw = _native_window(x.shape, kernel.shape, stride)
    fn = (
      native_depthwise.depthwise_affine_act_pooled
      if pooled
      else native_depthwise.depthwise_affine_act
    )
    return fn(
      x,
      kernel[:, :, :, 0].astype(x.dtype),
      scale,
      shift,
      stride,
      pads,
      out_hw,
      act,
    )
  y = depthwise_conv(x, kernel, stride, impl)
  y = _affine_act(y, scale, shift, act, x.dtype)
  if pooled:
    return y, jnp.mean(y.astype(jnp.float32), axis=(1, 2))
  return y


def expand_depthwise_affine_act(
  x: Array,
  expand: tuple[Array, Array, Array],
  kernel: Array,
  stride: int,
  scale: Array,
  shift: Array,
  act: Callable[[Array], Array] | None,
  impl: str = 'auto',
  pooled: bool = False,
) -> Array | tuple[Array, Array]:
  """An MBConv block's expand and depthwise layers at inference:
  `depthwise_conv_affine_act(pointwise_affine_act(x, *expand, act), ...)`
  with `expand` = (w [Cin, C], scale, shift) and one `act` for both.

  Where the CPU kernels run both, one kernel computes the expanded rows as
  the depthwise loop needs them (`native_depthwise.
  expand_depthwise_affine_act`): the block's largest tensor is never
  written. Elsewhere the two layers' own forms.
  """
  w, e_scale, e_shift = expand
  kh = kernel.shape[0]
  if impl == 'auto':
    impl = _default_depthwise_impl(x.dtype, kh, stride)
  if (
    impl == 'native'
    and native_depthwise.supports_epilogue(x.dtype, kh, stride, act)
    and native_pointwise.supports(
      x.dtype,
      *w.shape,
      act,
      any_width=True,
      max_in=native_pointwise.MAX_IN_AFFINE,
    )
  ):
    pads, out_hw = _native_window(x.shape, kernel.shape, stride)
    return native_depthwise.expand_depthwise_affine_act(
      x,
      w.astype(jnp.float32),
      e_scale,
      e_shift,
      kernel[:, :, :, 0].astype(x.dtype),
      scale,
      shift,
      stride,
      pads,
      out_hw,
      act,
      pooled,
    )
  y = pointwise_affine_act(x, w.astype(x.dtype), e_scale, e_shift, act, impl)
  return depthwise_conv_affine_act(
    y, kernel, stride, scale, shift, act, impl, pooled
  )


def _tap(src, r, c, size, stride):
  """src[:, r + s*o, c + s*o', :] for o < size (a strided window).

  With a stride, `src` (dims padded to multiples of the stride) is viewed
  as [B, H/s, s, W/s, s, C] and the window is a plain slice of that view:
  XLA:CPU fuses plain slices of one operand into a single loop, but wrote
  each strided slice out separately (9 extra passes per stride-2 layer).
  """
  if stride == 1:
    return lax.slice(
      src,
      (0, r, c, 0),
      (src.shape[0], r + size[0], c + size[1], src.shape[3]),
    )
  b, h, w, ch = src.shape
  view = src.reshape(b, h // stride, stride, w // stride, stride, ch)
  r0, c0 = r // stride, c // stride
  patch = lax.slice(
    view,
    (0, r0, r % stride, c0, c % stride, 0),
    (b, r0 + size[0], r % stride + 1, c0 + size[1], c % stride + 1, ch),
  )
  return patch.reshape(b, size[0], size[1], ch)


def _shifted_sum(src, kernel, start, size, stride, flip=False):
  """sum_ij src[:, start + i + s*o, start' + j + s*o'] * k[i, j] (fused).

  Low-precision inputs accumulate in f32, as conv units would.
  """
  kh, kw, _ = kernel.shape
  acc = jnp.promote_types(src.dtype, jnp.float32)
  out = None
  for i in range(kh):
    for j in range(kw):
      patch = _tap(src, start[0] + i, start[1] + j, size, stride)
      k = kernel[kh - 1 - i, kw - 1 - j] if flip else kernel[i, j]
      term = patch.astype(acc) * k.astype(acc)
      out = term if out is None else out + term
  return out


def _pads(x_shape, kernel_shape, stride):
  h, w = x_shape[1:3]
  kh, kw = kernel_shape[:2]
  return same_padding(h, kh, stride), same_padding(w, kw, stride)


def _native_window(x_shape, kernel_shape, stride):
  """((top, left) padding, (H', W')) of a TF-SAME window, as the CPU
  depthwise kernels take them (the bottom/right follow from the size)."""
  (pt, _), (pl, _) = _pads(x_shape, kernel_shape, stride)
  out_hw = (-(-x_shape[1] // stride), -(-x_shape[2] // stride))
  return (pt, pl), out_hw


def _pad_for_taps(x, kernel_shape, stride, value=0):
  """(TF-SAME padded x, output size) for `_tap` windows of `x`.

  Extra rows/cols (never read) make the padded dims multiples of the
  stride, for the reshaped view of `_tap`; all padding is `value`.
  """
  pad_h, pad_w = _pads(x.shape, kernel_shape, stride)
  pad_h = (pad_h[0], pad_h[1] + (-(x.shape[1] + sum(pad_h))) % stride)
  pad_w = (pad_w[0], pad_w[1] + (-(x.shape[2] + sum(pad_w))) % stride)
  xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)), constant_values=value)
  size = (-(-x.shape[1] // stride), -(-x.shape[2] // stride))
  return xp, size


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_shift(x: Array, kernel: Array, stride: int) -> Array:
  """Depthwise conv as shifted multiply-adds; kernel `[kh, kw, C]`."""
  return _depthwise_shift_fwd(x, kernel, stride)[0]


def _depthwise_shift_fwd(x, kernel, stride):
  xp, size = _pad_for_taps(x, kernel.shape, stride)
  out = _shifted_sum(xp, kernel.astype(x.dtype), (0, 0), size, stride)
  # The padded input is the residual: it is written once anyway (fused with
  # its producer), and saving x as well would write the input twice.
  return out.astype(x.dtype), (xp, kernel, x.shape)


def _depthwise_shift_bwd(stride, res, dy):
  # Autodiff of the forward transposes each strided slice into a padded
  # full-size tensor and adds nine of them (~6x slower on XLA:CPU). The
  # input gradient is itself a depthwise conv of dy (zero-dilated by the
  # stride) with the flipped kernel, so it gets the same fused form.
  xp, kernel, x_shape = res
  kh, kw, _ = kernel.shape
  (pt, _), (pl, _) = _pads(x_shape, kernel.shape, stride)
  h, w = x_shape[1:3]
  s1 = stride - 1
  dyp = lax.pad(
    dy,
    jnp.zeros((), dy.dtype),
    ((0, 0, 0), (kh - 1, kh - 1, s1), (kw - 1, kw - 1, s1), (0, 0, 0)),
  )
  dx = _shifted_sum(dyp, kernel.astype(dy.dtype), (pt, pl), (h, w), 1, True)
  # Kernel gradient: sum over (b, o) of xp[b, o*s + (i, j)] * dy[b, o].
  # Stride 1: sliding the small dy into xp's frame (a pad XLA fuses into the
  # reduction) is ~4x faster on XLA:CPU than slicing xp inside it; with a
  # stride the zero-dilated pad is slower than the strided slice.
  acc = jnp.promote_types(xp.dtype, jnp.float32)
  xp = xp.astype(acc)
  dy_acc = dy.astype(acc)
  dk = []
  for i in range(kh):
    for j in range(kw):
      if stride == 1:
        shifted = lax.pad(
          dy_acc,
          jnp.zeros((), acc),
          ((0, 0, 0), (i, kh - 1 - i, 0), (j, kw - 1 - j, 0), (0, 0, 0)),
        )
        dk.append(jnp.sum(xp * shifted, axis=(0, 1, 2)))
      else:
        patch = _tap(xp, i, j, dy.shape[1:3], stride)
        dk.append(jnp.sum(patch * dy_acc, axis=(0, 1, 2)))
  dk = jnp.stack(dk).reshape(kernel.shape)
  return dx.astype(dy.dtype), dk.astype(kernel.dtype)


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


def pointwise_affine_act(
  x: Array,
  kernel: Array,
  scale: Array,
  shift: Array,
  act: Callable[[Array], Array] | None,
  impl: str = 'auto',
) -> Array:
  """`act(pointwise(x, kernel) * scale + shift)`: a 1x1 conv followed by an
  inference-mode BN (per-channel affine) and its activation; `scale` None:
  a bias add (`shift`).

  One compiled pass on CPU for few input channels (the expand layers at
  high resolution, `native_pointwise`) where `impl` (the model's
  `depthwise_impl`: the choice of CPU kernels) is 'auto' or 'native';
  elsewhere, and for 'shift'/'lax' (export, meshes), the jnp form.
  """
  if (
    impl in ('auto', 'native')
    and native_pointwise.supports(
      x.dtype,
      kernel.shape[0],
      kernel.shape[1],
      act,
      any_width=True,
      max_in=native_pointwise.MAX_IN_AFFINE,
    )
    and jnp.dtype(kernel.dtype) == jnp.float32
  ):
    if scale is None and act is None:
      return _pointwise_bias_native(x, kernel, shift)
    if scale is None:
      scale = jnp.ones(kernel.shape[1:], jnp.float32)
    return native_pointwise.pointwise_affine_act(x, kernel, scale, shift, act)
  return _affine_act(pointwise(x, kernel), scale, shift, act, x.dtype)


@jax.custom_vjp
def _pointwise_bias_native(x: Array, kernel: Array, bias: Array) -> Array:
  """`pointwise(x, kernel) + bias` with the bias added as the kernel writes
  the product (the class predict: a pass over `[B, H, W, 810]` fewer);
  the gradient is `pointwise`'s written-out form plus the bias's sum."""
  ones = jnp.ones(kernel.shape[1:], jnp.float32)
  return native_pointwise.pointwise_affine_act(x, kernel, ones, bias, None)


def _pointwise_bias_fwd(x, kernel, bias):
  return _pointwise_bias_native(x, kernel, bias), (x, kernel)


def _pointwise_bias_bwd(res, dy):
  dx, dk = _pointwise_bwd(res, dy)
  return dx, dk, jnp.sum(dy, axis=tuple(range(dy.ndim - 1)))


@jax.custom_vjp
def pointwise(x: Array, kernel: Array) -> Array:
  """1x1 convolution `[B, H, W, C] x [C, D]` as one matrix product.

  The gradient is written out (dx = dy W^T, dW = x^T dy over all pixels):
  XLA:CPU's autodiff of the einsum lays the activation gradient out
  transposed for the kernel gradient, ~2.6x slower on a 16 -> 96 expand
  conv at 256x256 (measured in the profile of the D0 train step).
  """
  return jnp.einsum('bhwc,cd->bhwd', x, kernel)


def _pointwise_fwd(x, kernel):
  return pointwise(x, kernel), (x, kernel)


def _pointwise_bwd(res, dy):
  x, kernel = res
  dx = jnp.einsum('bhwd,cd->bhwc', dy, kernel)
  n = x.shape[0] * x.shape[1] * x.shape[2]
  dk = _kernel_grad(x.reshape(1, n, -1), dy.reshape(1, n, -1))[0]
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


def _kernel_grad(x: Array, dy: Array) -> Array:
  """`einsum('bnc,bnd->bcd', x, dy)`: per-image kernel gradients of a 1x1
  conv. Over many rows into few channels (the high resolutions) a CPU
  kernel that keeps the sums in registers (`native_weight_grad`: the D0
  b8 block-0 projection's 12.6 -> 3.5 ms); elsewhere XLA's dot."""
  if jnp.dtype(dy.dtype) == x.dtype and native_weight_grad.supports(
    x.dtype, x.shape[1], x.shape[2], dy.shape[2]
  ):
    return native_weight_grad.weight_grad(x, dy)
  return jnp.einsum('bnc,bnd->bcd', x, dy)


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)
_pointwise_bias_native.defvjp(_pointwise_bias_fwd, _pointwise_bias_bwd)


# Below this many pixels per image the gated activation is small and one
# shared kernel beats B per-image products (measured at batch 8: equal at
# 16x16, the folded form up to 10 % slower at 16x16x1152 -> 320).
_GATE_FOLD_MIN_PIXELS = 32 * 32


def pointwise_gated(x: Array, gate: Array, kernel: Array) -> Array:
  """`pointwise(gate[:, None, None, :] * x, kernel)`, `gate` `[B, C]`.

  Where the image is large the per-image channel gate (squeeze-excitation's
  sigmoid) is folded into a per-image kernel `[B, C, D]`, tiny next to the
  activation: the gated activation is never written, nor read back by the
  matrix product, nor differentiated elementwise. Measured on XLA:CPU at
  batch 8, forward + backward: 36 -> 19 ms at 256x256x32 -> 16, 27 -> 11
  ms at 64x64x240 -> 40. Equal to the product form up to float rounding.
  """
  if x.shape[1] * x.shape[2] < _GATE_FOLD_MIN_PIXELS:
    return pointwise(gate[:, None, None, :] * x, kernel)
  return _pointwise_gated_folded(x, gate, kernel)


@jax.custom_vjp
def _pointwise_gated_folded(x: Array, gate: Array, kernel: Array) -> Array:
  return jnp.einsum('bhwc,bcd->bhwd', x, _gated_kernel(gate, kernel))


def _gated_kernel(gate: Array, kernel: Array) -> Array:
  return gate[:, :, None] * kernel[None]


def _pointwise_gated_fwd(x, gate, kernel):
  return _pointwise_gated_folded(x, gate, kernel), (x, gate, kernel)


def _pointwise_gated_bwd(res, dy):
  x, gate, kernel = res
  b, c, d = x.shape[0], x.shape[-1], dy.shape[-1]
  dx = jnp.einsum('bhwd,bcd->bhwc', dy, _gated_kernel(gate, kernel))
  # Per-image kernel gradient, the same products as the ungated one's.
  dkb = _kernel_grad(x.reshape(b, -1, c), dy.reshape(b, -1, d)).astype(
    jnp.float32
  )
  dkernel = jnp.einsum('bc,bcd->cd', gate.astype(jnp.float32), dkb)
  dgate = jnp.einsum('bcd,cd->bc', dkb, kernel.astype(jnp.float32))
  return (
    dx.astype(x.dtype),
    dgate.astype(gate.dtype),
    dkernel.astype(kernel.dtype),
  )


_pointwise_gated_folded.defvjp(_pointwise_gated_fwd, _pointwise_gated_bwd)


class DepthwiseConv(nn.Module):
  """k x k depthwise conv (multiplier 1), TF SAME, no bias.

  The kernel is named `depthwise_kernel` with TF layout `[k, k, C, 1]`.
  """

  kernel_size: int
  stride: int = 1
  kernel_init: Initializer = backbone_conv_init
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(
    self,
    x: Array,
    epilogue: tuple[Array, Array, Callable[[Array], Array] | None]
    | None = None,
    pooled: bool = False,
    expand: tuple[Array, Array, Array] | None = None,
  ) -> Array | tuple[Array, Array]:
    """`epilogue` = (scale, shift, act): act(y * scale + shift) per channel
    (`depthwise_conv_affine_act`); with it, `pooled` also returns the
    output's mean over H, W `[B, C]` (f32). `expand` = (w [Cin, C], scale,
    shift), with the epilogue: x is the block's input, and the expand
    layer (1x1 conv, inference BN, the epilogue's act) runs first, fused
    where a kernel does both (`expand_depthwise_affine_act`)."""
    k = self.kernel_size
    c = x.shape[-1] if expand is None else expand[0].shape[-1]
    kernel = self.param(
      'depthwise_kernel', self.kernel_init, (k, k, c, 1), jnp.float32
    )
    x = x.astype(self.dtype)
    if expand is not None:
      if epilogue is None:
        raise ValueError('DepthwiseConv: expand needs the epilogue')
      return expand_depthwise_affine_act(
        x, expand, kernel, self.stride, *epilogue, self.impl, pooled
      )
    if epilogue is not None:
      return depthwise_conv_affine_act(
        x, kernel, self.stride, *epilogue, impl=self.impl, pooled=pooled
      )
    if pooled:
      raise ValueError('DepthwiseConv: pooled needs the epilogue')
    return depthwise_conv(x, kernel, self.stride, self.impl)


class SeparableConv(nn.Module):
  """Keras SeparableConv2D (3x3 depthwise, then 1x1 pointwise, then bias).

  Variables: `depthwise_kernel [k,k,Cin,1]`, `pointwise_kernel [1,1,Cin,
  Cout]`, `bias [Cout]` — the official names, so checkpoints map by name.
  """

  features: int
  kernel_size: int = 3
  use_bias: bool = True
  depthwise_init: Initializer = glorot_uniform
  pointwise_init: Initializer = glorot_uniform
  bias_init: Initializer = initializers.zeros
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array, bn: BatchNorm | None = None) -> Array:
    """`bn`: returns `bn(separable_conv(x))`, the 1x1 product computed with
    a training-mode BN where a kernel does both (`Conv(bn=)`); with an
    inference-mode BN, the bias, BN and activation applied as the product
    is written (`pointwise_affine_act`). Without a BN the bias is added
    that way (the predict layers)."""
    k, cin = self.kernel_size, x.shape[-1]
    dw = self.param(
      'depthwise_kernel', self.depthwise_init, (k, k, cin, 1), jnp.float32
    )
    pw = self.param(
      'pointwise_kernel',
      self.pointwise_init,
      (1, 1, cin, self.features),
      jnp.float32,
    )
    x = depthwise_conv(x.astype(self.dtype), dw, 1, self.impl)
    b = None
    if self.use_bias:
      b = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    if bn is not None and _fuses_train_bn(x, pw, bn, self.impl):
      fused = _pointwise_train_bn(x, pw[0, 0], b)
      return bn(jnp.zeros((0, self.features), x.dtype), fused=fused)
    w = pw[0, 0].astype(self.dtype)
    if bn is not None and bn.use_running_average:
      # BN(x @ w + b) = (x @ w) * mul + (b * mul + shift).
      mul, shift = bn(jnp.zeros((0, self.features), x.dtype), affine_only=True)
      if b is not None:
        shift = shift + b * mul
      return pointwise_affine_act(x, w, mul, shift, bn.act, self.impl)
    if bn is None and b is not None:
      return pointwise_affine_act(x, w, None, b, None, self.impl)
    x = pointwise(x, w)
    if b is not None:
      x = x + b.astype(self.dtype)
    return x if bn is None else bn(x)


class Conv(nn.Module):
  """Dense (non-grouped) conv, TF SAME padding, f32 `kernel [k,k,in,out]`.

  The parameters are `nn.Conv`'s (`kernel`, `bias`). A 1x1 stride-1 conv is
  computed as a matrix product: XLA:CPU takes the kernel gradient of a
  convolution through a slow generic path (profiled at ~10x a `dot` of the
  same size), and most of EfficientNet's FLOPs are 1x1 convs.
  """

  features: int
  kernel_size: int
  stride: int = 1
  use_bias: bool = True
  kernel_init: Initializer = glorot_uniform
  bias_init: Initializer = initializers.zeros
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(
    self,
    x: Array,
    gate: Array | None = None,
    epilogue: tuple[Array, Array, Callable | None] | None = None,
    bn: BatchNorm | None = None,
    kernel_only: bool = False,
  ) -> Array:
    """`gate` ([B, C], 1x1 stride-1 only) multiplies x's channels first.

    `epilogue` = (scale, shift, act), without bias or gate: returns
    `act(conv(x) * scale + shift)` (the inference BN after the conv), in
    the same pass where the conv is a matrix product that
    `pointwise_affine_act` has a kernel for (1x1, or im2col).

    `bn`, without bias, gate or epilogue: returns `bn(conv(x))`; in
    training, where the conv is a 1x1 that `native_pointwise` has a kernel
    for, the BN (statistics, normalisation, activation and their gradient)
    is computed with the matrix product (`pointwise_bn_act_train`).

    `kernel_only`: returns the f32 kernel and computes nothing (for a
    kernel that runs this layer with the next, `DepthwiseConv(expand=)`).
    """
    k = self.kernel_size
    kernel = self.param(
      'kernel',
      self.kernel_init,
      (k, k, x.shape[-1], self.features),
      jnp.float32,
    )
    if kernel_only:
      return kernel
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if bn is not None:
      if gate is not None or epilogue is not None:
        raise ValueError('Conv: a bn needs a conv without gate/epilogue')
      b = self._bias()
      if (
        k == 1
        and self.stride == 1
        and _fuses_train_bn(x, kernel, bn, self.impl)
      ):
        fused = _pointwise_train_bn(x, kernel[0, 0], b)
        return bn(jnp.zeros((0, self.features), x.dtype), fused=fused)
      y = dense_conv(x, kernel, self.stride, self.impl)
      return bn(y if b is None else y + b.astype(self.dtype))
    if epilogue is not None:
      if gate is not None or self.use_bias:
        raise ValueError('Conv: an epilogue needs a conv without bias/gate')
      if k == 1 and self.stride == 1:
        return pointwise_affine_act(x, kernel[0, 0], *epilogue, self.impl)
      if _use_im2col(k, x.shape[-1], self.impl):
        return conv_im2col(x, kernel, self.stride, epilogue, self.impl)
    if gate is not None:
      if k != 1 or self.stride != 1:
        raise ValueError('Conv: a gate needs a 1x1 stride-1 conv')
      y = pointwise_gated(x, gate.astype(self.dtype), kernel[0, 0])
    else:
      y = dense_conv(x, kernel, self.stride, self.impl)
    if self.use_bias:
      y = y + self._bias().astype(self.dtype)
    if epilogue is not None:
      y = _affine_act(y, *epilogue, self.dtype)
    return y

  def _bias(self) -> Array | None:
    if not self.use_bias:
      return None
    return self.param('bias', self.bias_init, (self.features,), jnp.float32)


def dense_conv(x: Array, kernel: Array, stride: int, impl: str) -> Array:
  """TF-SAME conv: a matrix product (1x1), im2col (narrow), else XLA's."""
  k = kernel.shape[0]
  if k == 1 and stride == 1:
    return pointwise(x, kernel[0, 0])
  if _use_im2col(k, x.shape[-1], impl):
    return conv_im2col(x, kernel, stride)
  return lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(stride, stride),
    padding='SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )


def _fuses_train_bn(x: Array, kernel: Array, bn: BatchNorm, impl: str) -> bool:
  """Whether `native_pointwise.pointwise_bn_act_train` computes this 1x1
  conv (`kernel` [1, 1, C, D]) with the training-mode `bn` after it: the
  CPU kernels are on (`impl` 'auto'/'native', the model's
  `depthwise_impl`) and have a kernel for the shape."""
  return (
    not bn.use_running_average
    and impl in ('auto', 'native')
    and jnp.dtype(kernel.dtype) == jnp.float32
    and native_pointwise.supports(x.dtype, *kernel.shape[2:], bn.act)
  )


def _pointwise_train_bn(x: Array, w: Array, bias: Array | None):
  """`BatchNorm(fused=)` for BN(x @ w + bias) in training mode.

  The bias is left out of the product: a per-channel constant moves the
  batch mean by itself and leaves the batch variance, so the normalised
  output is the same and the bias's gradient is zero (the official code's
  autodiff gives rounding noise there); it is added to the mean the
  running average sees.
  """

  def fused(scale, beta, epsilon, act):
    z, mean, var = native_pointwise.pointwise_bn_act_train(
      x, w, scale, beta, epsilon, act
    )
    return z, (mean if bias is None else mean + bias), var

  return fused


# A k x k conv over few input channels (the stem: 3x3 over RGB) is an
# im2col matrix product on CPU: XLA:CPU's convolution path took 81 ms for
# the D0 stem at batch 8 (~5 ms of arithmetic); the patches are k*k*C wide.
_IM2COL_MAX_WIDTH = 64


def _use_im2col(kernel_size: int, in_channels: int, impl: str) -> bool:
  """im2col for narrow convs where the depthwise form is a CPU one.

  `impl` follows the model's `depthwise_impl`: 'lax' (what TPUs and GPUs
  run, and what `plan_memory` compiles) keeps XLA's convolution, whose
  H split GSPMD keeps; im2col's stride-2 view of an odd padded height
  made it gather the whole image on a `spatial` mesh.
  """
  if impl == 'auto':
    impl = _default_depthwise_impl()
  return (
    impl in ('shift', 'native')
    and kernel_size * kernel_size * in_channels <= _IM2COL_MAX_WIDTH
  )


def conv_im2col(
  x: Array,
  kernel: Array,
  stride: int,
  epilogue: tuple[Array, Array, Callable | None] | None = None,
  impl: str = 'auto',
) -> Array:
  """TF-SAME conv as patches `[B, H', W', k*k*C]` times `[k*k*C, D]`.

  The patches are the strided taps (`_tap`) of the padded input,
  concatenated tap-major, channel-minor: the order of `kernel.reshape`.
  `epilogue` (scale, shift, act) and `impl`: `pointwise_affine_act`'s.
  """
  kh, kw, cin, cout = kernel.shape
  xp, size = _pad_for_taps(x, kernel.shape, stride)
  w = kernel.reshape(kh * kw * cin, cout)
  if epilogue is not None:
    scale, shift, act = epilogue
    if (
      impl in ('auto', 'native')
      and native_pointwise.supports(x.dtype, kh * kw * cin, cout, act, True)
      and jnp.dtype(w.dtype) == jnp.float32
    ):
      return _im2col_affine_act_native(
        xp, w, scale, shift, act, (kh, kw, stride), size
      )
    return _im2col_affine_act(xp, w, scale, shift, act, (kh, kw, stride), size)
  if (
    impl in ('auto', 'native')
    and native_pointwise.supports(x.dtype, kh * kw * cin, cout, None, True)
    and native_weight_grad.supports_im2col(x.dtype, kw, cin)
    and jnp.dtype(w.dtype) == jnp.float32
  ):
    return _im2col_native(xp, w, (kh, kw, stride), size)
  return pointwise(_patches(xp, kh, kw, stride, size), w)


def _patches(xp, kh, kw, stride, size):
  """[B, H', W', kh*kw*C]: the strided taps of the padded input,
  tap-major, channel-minor."""
  taps = [_tap(xp, i, j, size, stride) for i in range(kh) for j in range(kw)]
  return jnp.concatenate(taps, axis=-1)


def _im2col_affine_act(xp, w, scale, shift, act, window, size):
  """The jnp form of `native_pointwise.im2col_affine_act`."""
  kh, kw, stride = window
  patches = _patches(xp, kh, kw, stride, size)
  return _affine_act(pointwise(patches, w), scale, shift, act, xp.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _im2col_affine_act_native(xp, w, scale, shift, act, window, size):
  """The stem's conv + inference BN + act in one kernel (no patch matrix);
  its gradient is the jnp form's."""
  return native_pointwise.im2col_affine_act(
    xp, w, scale, shift, act, window, size
  )


def _im2col_native_fwd(xp, w, scale, shift, act, window, size):
  out = _im2col_affine_act_native(xp, w, scale, shift, act, window, size)
  return out, (xp, w, scale, shift)


def _im2col_native_bwd(act, window, size, res, dy):
  unfused = lambda *a: _im2col_affine_act(*a, act, window, size)  # noqa: E731
  return jax.vjp(unfused, *res)[1](dy)


_im2col_affine_act_native.defvjp(_im2col_native_fwd, _im2col_native_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _im2col_native(xp, w, window, size):
  """The conv alone (the stem in training, its BN after it) from the
  padded image, and its kernel gradient from the image too: the patch
  matrix is never built (D0 b8: the patches' concatenate and the dots
  over them, ~40 ms of the step, against ~20 ms in the two kernels)."""
  ones = jnp.ones(w.shape[1:], jnp.float32)
  zeros = jnp.zeros(w.shape[1:], jnp.float32)
  return native_pointwise.im2col_affine_act(
    xp, w, ones, zeros, None, window, size
  )


def _im2col_fwd(xp, w, window, size):
  return _im2col_native(xp, w, window, size), (xp, w)


def _im2col_bwd(window, size, res, dy):
  xp, w = res
  kh, kw, stride = window
  # The image's gradient (none in a model: XLA drops it) from the jnp form.
  dxp = jax.vjp(
    lambda xp: pointwise(_patches(xp, kh, kw, stride, size), w), xp
  )[1](dy)[0]
  return dxp, native_weight_grad.im2col_weight_grad(xp, dy, window)


_im2col_native.defvjp(_im2col_fwd, _im2col_bwd)


def conv(
  features: int,
  kernel_size: int,
  stride: int = 1,
  *,
  use_bias: bool,
  kernel_init: Initializer,
  dtype: Dtype,
  name: str,
  impl: str = 'auto',
) -> Conv:
  """A dense conv with TF SAME padding and f32 parameters."""
  return Conv(
    features,
    kernel_size,
    stride,
    use_bias=use_bias,
    kernel_init=kernel_init,
    dtype=dtype,
    impl=impl,
    name=name,
  )


# --------------------------------------------------------------------------
# Resizing used by the BiFPN.


def max_pool_same(
  x: Array, window: int, stride: int, impl: str = 'auto'
) -> Array:
  """Max-pool with TF SAME padding (padded cells never win).

  Where the depthwise form is a CPU one (`impl` follows the model's
  `depthwise_impl`), the max of the window's taps (plain slices, `_tap`),
  with a VJP that routes each output's gradient to the first maximum in
  the window's row-major order, as TF's MaxPoolGrad does: autodiff of
  XLA's reduce-window max goes through a variadic reduce-window that
  tracks indices, which XLA:CPU ran at ~12 ms for one `[8, 64, 64, 64]`
  pool (D0 train step: ~60 ms of pooling, forward + backward). 'lax'
  (TPUs, GPUs, `plan_memory`) keeps XLA's reduce-window, whose H split
  GSPMD keeps on a `spatial` mesh; the taps' stride view of an odd padded
  height makes it gather (as for the stem, `_use_im2col`).
  """
  if x.shape[1] < 1 or x.shape[2] < 1:
    raise ValueError(f'cannot max-pool an empty input {x.shape}')
  if impl == 'auto':
    impl = _default_depthwise_impl()
  if impl not in ('shift', 'native'):
    return nn.max_pool(
      x, (window, window), strides=(stride, stride), padding='SAME'
    )
  return _max_pool_taps(x, window, stride)


def _pool_taps(x, window, stride):
  """The window's taps of the -inf padded x, row-major, each `[B, oh, ow,
  C]`."""
  xp, size = _pad_for_taps(x, (window, window), stride, -jnp.inf)
  return [
    _tap(xp, i, j, size, stride) for i in range(window) for j in range(window)
  ]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool_taps(x: Array, window: int, stride: int) -> Array:
  return functools.reduce(jnp.maximum, _pool_taps(x, window, stride))


def _max_pool_fwd(x, window, stride):
  out = _max_pool_taps(x, window, stride)
  return out, (x, out)


def _max_pool_bwd(window, stride, res, g):
  x, out = res
  taps = _pool_taps(x, window, stride)
  # Index of the first tap equal to the max (a NaN output matches no tap
  # and gets no gradient, as in TF).
  first = jnp.full(out.shape, len(taps), jnp.int32)
  for t in reversed(range(len(taps))):
    first = jnp.where(taps[t] == out, t, first)
  # dx[q] = sum over taps (i, j) of g[o] where q = o * stride + (i, j) and
  # first[o] is that tap: with g and `first` zero-dilated by the stride,
  # each tap is a plain shifted slice, and XLA fuses the sum into one loop.
  (pt, _), (pl, _) = _pads(x.shape, (window, window), stride)
  h, w = x.shape[1:3]
  oh, ow = out.shape[1:3]
  k1, s1 = window - 1, stride - 1
  # High padding so every input row/column has a full set of taps.
  hi_h = k1 + max(0, pt + h - ((oh - 1) * stride + window))
  hi_w = k1 + max(0, pl + w - ((ow - 1) * stride + window))
  dims = ((0, 0, 0), (k1, hi_h, s1), (k1, hi_w, s1), (0, 0, 0))
  gd = lax.pad(g, jnp.zeros((), g.dtype), dims)
  fd = lax.pad(first, jnp.int32(-1), dims)
  dx = None
  for i in range(window):
    for j in range(window):
      start = (0, pt + k1 - i, pl + k1 - j, 0)
      stop = (x.shape[0], start[1] + h, start[2] + w, x.shape[3])
      hit = lax.slice(fd, start, stop) == i * window + j
      term = jnp.where(hit, lax.slice(gd, start, stop), 0)
      dx = term if dx is None else dx + term
  return (dx.astype(x.dtype),)


_max_pool_taps.defvjp(_max_pool_fwd, _max_pool_bwd)
