"""Building blocks shared by the backbone, BiFPN and heads.

Everything here follows TensorFlow semantics, because the official
google/automl EfficientDet is the reference:

* "SAME" padding is TF's: out = ceil(n / s) and any odd padding goes to the
  bottom/right (`jax.lax`'s 'SAME' uses the same rule).
* BatchNorm is Keras' (momentum 0.99, epsilon 1e-3), statistics in float32
  (`batch_norm.py`).
* Kernels keep TF layouts (conv `[kh, kw, in, out]`, depthwise
  `[kh, kw, C, 1]`) so converting official checkpoints is a rename.

`conv2d`, `depthwise_conv2d` and `max_pool2d` are marked as backend forms
(`effdet_jax.ops`): what is written here is what TPUs and GPUs run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from effdet_jax import ops
from effdet_jax.models import initializers
from effdet_jax.models.batch_norm import BatchNorm

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


def batch_norm(
  train: bool,
  dtype: Dtype,
  name: str,
  act: Callable[[Array], Array] | None = None,
) -> BatchNorm:
  """Keras-equivalent BatchNorm (f32 parameters and statistics), then `act`."""
  return BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
    act=act,
    name=name,
  )


# --------------------------------------------------------------------------
# Activations (official `utils.activation_fn`).


def swish(x: Array) -> Array:
  return x * jax.nn.sigmoid(x)


def relu6(x: Array) -> Array:
  return jnp.clip(x, 0, 6)


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
  'swish': swish,
  'silu': swish,
  'swish_native': swish,
  'relu': jax.nn.relu,
  'relu6': relu6,
  'hswish': lambda x: x * relu6(x + 3) / 6,
  'mish': lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


def activation(name: str) -> Callable[[Array], Array]:
  """Returns the activation the official `utils.activation_fn` names."""
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise ValueError(
      f'unknown act_type {name!r}; valid: {sorted(_ACTIVATIONS)}'
    ) from None


# --------------------------------------------------------------------------
# Gradient checkpointing.

# `jax.checkpoint_policies` by name: what a rematerialised block keeps from
# its forward pass. nothing_saveable keeps only the block's inputs (least
# memory, the whole block recomputed); dots_saveable also keeps convolution
# and matmul outputs (BN, activations and pooling recomputed).
REMAT_POLICIES = ('nothing_saveable', 'dots_saveable', 'everything_saveable')


def rematerialized(cls: type, policy: str) -> type:
  """`cls` recomputed in the backward pass (`nn.remat`; the module's call
  takes `train` as argument 2, static) under a named policy."""
  if policy not in REMAT_POLICIES:
    raise ValueError(
      f'unknown remat policy {policy!r}; valid: {REMAT_POLICIES}'
    )
  return nn.remat(
    cls,
    static_argnums=(2,),
    policy=getattr(jax.checkpoint_policies, policy),
  )


# --------------------------------------------------------------------------
# Initialisers.

# Backbone: plain normal with std sqrt(2 / fan_out), fan_out = kh*kw*out
# (official `efficientnet_model.py: conv_kernel_initializer`).
backbone_conv_init = initializers.VarianceScaling(2.0, 'fan_out', 'normal')
# BiFPN: Keras' default glorot-uniform (fans computed from the TF layout).
glorot_uniform = initializers.VarianceScaling(1.0, 'fan_avg', 'uniform')
# Heads: Keras 'variance_scaling' = scale 1, fan_in, truncated normal
# (official `tf2/efficientdet_keras.py: ClassNet`, `BoxNet`).
head_init = initializers.VarianceScaling(1.0, 'fan_in', 'truncated_normal')


# --------------------------------------------------------------------------
# Convolutions and pooling with TF "SAME" padding.


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF SAME padding (before, after) for one spatial dimension."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


@ops.backend_form('conv2d')
def conv2d(x: Array, kernel: Array, stride: int = 1) -> Array:
  """Dense convolution, TF SAME padding; `kernel` `[kh, kw, in, out]`."""
  return lax.conv_general_dilated(
    x,
    kernel.astype(x.dtype),
    window_strides=(stride, stride),
    padding='SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )


@ops.backend_form('depthwise_conv2d')
def depthwise_conv2d(x: Array, kernel: Array, stride: int = 1) -> Array:
  """Depthwise convolution (multiplier 1), TF SAME padding.

  Args:
    x: `[B, H, W, C]`.
    kernel: `[kh, kw, C, 1]` (TF depthwise layout).
    stride: the same stride for H and W.

  Returns:
    `[B, ceil(H / stride), ceil(W / stride), C]`.
  """
  kh, kw, channels, mult = kernel.shape
  if mult != 1 or channels != x.shape[-1]:
    raise ValueError(
      f'depthwise kernel {kernel.shape} does not fit input {x.shape}'
    )
  return lax.conv_general_dilated(
    x,
    kernel.astype(x.dtype).reshape(kh, kw, 1, channels),
    window_strides=(stride, stride),
    padding='SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=channels,
  )


@ops.backend_form('max_pool2d')
def max_pool2d(x: Array, window: int, stride: int) -> Array:
  """Max-pool with TF SAME padding (padded cells never win)."""
  if x.shape[1] < 1 or x.shape[2] < 1:
    raise ValueError(f'cannot max-pool an empty input {x.shape}')
  return nn.max_pool(
    x, (window, window), strides=(stride, stride), padding='SAME'
  )


def resize_nearest_legacy(x: Array, out_h: int, out_w: int) -> Array:
  """TF1 `resize_nearest_neighbor` (no half-pixel centres), in float32.

  Source index = floor(i * in / out), which for 2x is pixel repetition and
  differs from `jax.image.resize('nearest')` for non-integer ratios
  (official `tf2/efficientdet_keras.py: ResampleFeatureMap._upsample2d`).
  """
  _, h, w, _ = x.shape
  dtype = x.dtype
  x = x.astype(jnp.float32)
  if out_h % h == 0 and out_w % w == 0:
    x = jnp.repeat(jnp.repeat(x, out_h // h, axis=1), out_w // w, axis=2)
  else:
    rows = np.minimum((np.arange(out_h) * h) // out_h, h - 1)
    cols = np.minimum((np.arange(out_w) * w) // out_w, w - 1)
    x = jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)
  return x.astype(dtype)


def drop_connect(x: Array, survival_prob: float, rng: Array | None) -> Array:
  """Official drop-connect: per-sample keep mask, scaled by 1/p
  (`utils.drop_connect`).

  The identity when `rng` is None (inference) or survival_prob >= 1.
  """
  if rng is None or survival_prob >= 1.0:
    return x
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  keep = jnp.floor(survival_prob + jax.random.uniform(rng, shape, jnp.float32))
  return (x / survival_prob) * keep.astype(x.dtype)


# --------------------------------------------------------------------------
# Modules. Parameter names are Keras': `kernel`, `bias`, `depthwise_kernel`,
# `pointwise_kernel`, so official checkpoints map by name.


class Conv(nn.Module):
  """Dense (non-grouped) conv, TF SAME padding, f32 `kernel [k,k,in,out]`."""

  features: int
  kernel_size: int
  stride: int = 1
  use_bias: bool = True
  kernel_init: Initializer = glorot_uniform
  bias_init: Initializer = initializers.zeros
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    kernel = self.param(
      'kernel',
      self.kernel_init,
      (k, k, x.shape[-1], self.features),
      jnp.float32,
    )
    y = conv2d(x.astype(self.dtype), kernel, self.stride)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class DepthwiseConv(nn.Module):
  """k x k depthwise conv (multiplier 1), TF SAME, no bias.

  The kernel is named `depthwise_kernel` with TF layout `[k, k, C, 1]`.
  """

  kernel_size: int
  stride: int = 1
  kernel_init: Initializer = backbone_conv_init
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    kernel = self.param(
      'depthwise_kernel',
      self.kernel_init,
      (k, k, x.shape[-1], 1),
      jnp.float32,
    )
    return depthwise_conv2d(x.astype(self.dtype), kernel, self.stride)


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

  @nn.compact
  def __call__(self, x: Array) -> Array:
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
    x = depthwise_conv2d(x.astype(self.dtype), dw, 1)
    y = conv2d(x, pw, 1)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def conv(
  features: int,
  kernel_size: int,
  stride: int = 1,
  *,
  use_bias: bool,
  kernel_init: Initializer,
  dtype: Dtype,
  name: str,
) -> Conv:
  """A dense conv with TF SAME padding and f32 parameters."""
  return Conv(
    features,
    kernel_size,
    stride,
    use_bias=use_bias,
    kernel_init=kernel_init,
    dtype=dtype,
    name=name,
  )
