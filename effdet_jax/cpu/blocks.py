"""The model's blocks as the `cpu` backend computes them (`ops.backend_form`).

Each form is called with the plain method and the bound plain module, and
builds the block's layers from `effdet_jax.cpu.layers` under the plain
module's scope with the plain layers' names, so the variables are the same
tree. What each fuses, and why it needs to see two layers at once:

* training: a 1x1 conv computed with the BN after it (statistics,
  normalisation, activation and their gradient with the matrix product,
  `Conv(bn=)`), and squeeze-excitation's squeeze summed as the BN writes
  its output (`BatchNorm(pooled=)`); the SE gate folded into the
  projection's kernel (`pointwise_gated`); the BiFPN fusion with the
  op-after-combine's activation (`native_fusion`);
* inference: every BN folded into the conv before it, applied with the
  activation as the conv writes its output (`epilogue=`), and an MBConv
  block's expand and depthwise layers in one kernel (`expand=`), so its
  largest tensor is never written.

`tests/test_backends.py` checks that each block here computes what the plain
block computes, with the same variables.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effdet_jax.cpu import layers, native_fusion
from effdet_jax.models import initializers
from effdet_jax.models import layers as plain_layers

Array = jax.Array


def stem(plain, m, x: Array, train: bool) -> Array:
  """`efficientnet.Stem`: the conv with its BN (training) or with the BN's
  affine and the activation as its epilogue (inference)."""
  del plain
  conv = layers.conv(
    m.filters,
    3,
    2,
    use_bias=False,
    kernel_init=plain_layers.backbone_conv_init,
    dtype=m.dtype,
    name='conv2d',
  )
  bn = layers.batch_norm(train, m.dtype, 'tpu_batch_normalization', m.act)
  if train:
    return conv(x, bn=bn)
  affine = bn(jnp.zeros((0, m.filters), x.dtype), affine_only=True)
  return conv(x, epilogue=(*affine, m.act))


class _SqueezeGate(nn.Module):
  """`efficientnet.SqueezeExcite`'s gate `[B, C]` from the squeezed mean."""

  reduced: int
  act: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, squeezed: Array, channels: int) -> Array:
    mk = lambda features, name: layers.conv(
      features,
      1,
      use_bias=True,
      kernel_init=plain_layers.backbone_conv_init,
      dtype=self.dtype,
      name=name,
    )
    s = squeezed[:, None, None, :].astype(self.dtype)
    s = mk(self.reduced, 'conv2d')(s)
    s = mk(channels, 'conv2d_1')(self.act(s))
    return jax.nn.sigmoid(s)[:, 0, 0, :]


def mbconv_block(plain, m, inputs: Array, train: bool) -> Array:
  """`efficientnet.MBConvBlock` with its layers fused (module docstring)."""
  del plain
  a = m.args
  bn_names = iter(
    ['tpu_batch_normalization']
    + [f'tpu_batch_normalization_{i}' for i in (1, 2)]
  )
  conv_names = iter(['conv2d', 'conv2d_1'])
  conv = lambda features: layers.conv(
    features,
    1,
    use_bias=False,
    kernel_init=plain_layers.backbone_conv_init,
    dtype=m.dtype,
    name=next(conv_names),
  )
  bn = lambda act=None: layers.batch_norm(train, m.dtype, next(bn_names), act)

  x = inputs
  fused_expand = None
  if a.expand_ratio != 1:
    expanded = inputs.shape[-1] * a.expand_ratio
    expand = conv(expanded)
    bn0 = bn(m.act)
    if train:
      x = expand(x, bn=bn0)
    else:
      # The expand layer goes to the depthwise layer, which runs both with
      # their BN and activation (BN reads only the feature count here).
      affine = bn0(jnp.zeros((0, expanded), x.dtype), affine_only=True)
      fused_expand = (expand(x, kernel_only=True)[0, 0], *affine)
  depthwise = layers.DepthwiseConv(
    a.kernel_size, a.stride, dtype=m.dtype, name='depthwise_conv2d'
  )
  bn_dw = bn(m.act)
  has_se = a.se_ratio is not None and 0 < a.se_ratio <= 1
  squeezed = None
  if train and has_se:
    x, squeezed = bn_dw(depthwise(x), pooled=True)
  elif train:
    x = bn_dw(depthwise(x))
  else:
    width = x.shape[-1] if fused_expand is None else expanded
    epilogue = (
      *bn_dw(jnp.zeros((0, width), x.dtype), affine_only=True),
      m.act,
    )
    out = depthwise(x, epilogue=epilogue, pooled=has_se, expand=fused_expand)
    x, squeezed = out if has_se else (out, None)
  gate = None
  if has_se:
    reduced = max(1, int(a.input_filters * a.se_ratio))
    gate = _SqueezeGate(reduced, m.act, m.dtype, name='se')(
      squeezed, x.shape[-1]
    )
  x = conv(a.output_filters)(x, gate)
  x = bn()(x)
  if a.id_skip and a.stride == 1 and a.input_filters == a.output_filters:
    rng = m.make_rng('dropout') if train and 0 < m.survival_prob < 1 else None
    x = plain_layers.drop_connect(x, m.survival_prob, rng) + inputs
  return x


class _OpAfterCombine(nn.Module):
  """`bifpn.OpAfterCombine`, its conv computed with its BN; `activated`:
  the input is activated already (by the fusion kernel)."""

  num_filters: int
  act: Any
  separable: bool = True
  conv_bn_act_pattern: bool = False
  dtype: Any = jnp.float32
  activated: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    if not self.conv_bn_act_pattern and not self.activated:
      x = self.act(x)
    if self.separable:
      conv = layers.SeparableConv(
        self.num_filters,
        use_bias=not self.conv_bn_act_pattern,
        dtype=self.dtype,
        name='conv',
      )
    else:
      conv = layers.conv(
        self.num_filters,
        3,
        use_bias=not self.conv_bn_act_pattern,
        kernel_init=plain_layers.glorot_uniform,
        dtype=self.dtype,
        name='conv',
      )
    act = self.act if self.conv_bn_act_pattern else None
    return conv(x, bn=layers.batch_norm(train, self.dtype, 'bn', act))


def fnode(plain, m, feats, target_hw, train: bool) -> Array:
  """`bifpn.FNode`: in training the fast-attention fusion and the
  activation after it in one kernel where it applies; the op-after-combine
  with its conv computed with its BN."""
  del plain
  from effdet_jax.models import bifpn  # noqa: PLC0415 - models import ops

  nodes = [
    bifpn.ResampleFeatureMap(
      m.num_filters,
      m.apply_bn_for_resampling,
      m.conv_after_downsample,
      m.dtype,
      name=f'resample_{pos}_{fid}_{m.node_id}',
    )(feats[fid], target_hw, train)
    for pos, fid in enumerate(m.input_ids)
  ]
  fused = None
  if (
    train
    and m.weight_method in ('fastattn', 'channel_fastattn')
    and not m.conv_bn_act_pattern
    and native_fusion.supports(nodes[0].dtype, len(nodes), m.act)
  ):
    # Training only: there it saves the backward's and the residuals'
    # passes; the inference forward is one XLA fusion already.
    weights = jnp.stack(m.fusion_weights(len(nodes)))
    fused = native_fusion.fast_fusion_act(tuple(nodes), weights, m.act)
  return _OpAfterCombine(
    m.num_filters,
    m.act,
    m.separable,
    m.conv_bn_act_pattern,
    m.dtype,
    activated=fused is not None,
    name=f'op_after_combine{m.node_id}',
  )(m.fuse(nodes) if fused is None else fused, train)


def head_net(plain, m, feats, train: bool = False) -> list[Array]:
  """`heads.HeadNet`, each separable conv computed with its BN."""
  if not m.separable:
    return plain(m, feats, train)
  act = plain_layers.activation(m.act_type)
  sep = lambda features, name, bias_init=initializers.zeros: (
    layers.SeparableConv(
      features,
      depthwise_init=plain_layers.head_init,
      pointwise_init=plain_layers.head_init,
      bias_init=bias_init,
      dtype=m.dtype,
      name=name,
    )
  )
  convs = [sep(m.num_filters, f'{m.prefix}-{i}') for i in range(m.repeats)]
  predict = sep(
    m.num_outputs,
    f'{m.prefix}-predict',
    initializers.Constant(m.bias_init_value),
  )
  outputs = []
  for level_id, x in enumerate(feats):
    level = m.min_level + level_id
    for i in range(m.repeats):
      skip = x
      bn = layers.batch_norm(train, m.dtype, f'{m.prefix}-{i}-bn-{level}', act)
      x = convs[i](x, bn=bn)
      if i > 0 and m.survival_prob:
        rng = m.make_rng('dropout') if train else None
        x = plain_layers.drop_connect(x, m.survival_prob, rng) + skip
    outputs.append(predict(x))
  return outputs
