"""EfficientNet B0-B7 and EfficientNet-lite0..4 as the detector's backbone.

Facts relied on (official `backbone/efficientnet_builder.py`,
`efficientnet_lite_builder.py`, `efficientnet_model.py`):
* the B0 block table, width/depth coefficients and filter/repeat rounding;
* MBConv = [expand 1x1 -> BN -> act] -> depthwise -> BN -> act -> SE (reduce
  from the block's *input* filters) -> project 1x1 -> BN (no act) -> skip;
* drop-connect survival 1 - 0.2 * idx / N on skip blocks, off for 'b0';
* lite: relu6, no SE, stem 32 and first/last stage repeats not scaled;
* endpoints: outputs of stages 1, 2, 3, 5, 7 (`reduction_1..5`).

Module and variable names are the official scopes (`stem/conv2d`,
`blocks_3/tpu_batch_normalization_1`, `se/conv2d_1`, ...).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effdet_jax import ops
from effdet_jax.models import layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockArgs:
  """One MBConv block, after scaling (all numbers are actual channels)."""

  kernel_size: int
  stride: int
  expand_ratio: int
  input_filters: int
  output_filters: int
  se_ratio: float | None
  id_skip: bool = True
  stage: int = 0  # index of the block's stage in the B0 table


# Official B0 base blocks: (repeats, kernel, stride, expand, in, out, se).
_B0_BLOCKS = (
  (1, 3, 1, 1, 32, 16, 0.25),
  (2, 3, 2, 6, 16, 24, 0.25),
  (2, 5, 2, 6, 24, 40, 0.25),
  (3, 3, 2, 6, 40, 80, 0.25),
  (3, 5, 1, 6, 80, 112, 0.25),
  (4, 5, 2, 6, 112, 192, 0.25),
  (1, 3, 1, 6, 192, 320, 0.25),
)

# (width, depth) per backbone: `efficientnet_builder.efficientnet_params`
# and `efficientnet_lite_builder.efficientnet_lite_params`.
BACKBONES: dict[str, tuple[float, float]] = {
  'efficientnet-b0': (1.0, 1.0),
  'efficientnet-b1': (1.0, 1.1),
  'efficientnet-b2': (1.1, 1.2),
  'efficientnet-b3': (1.2, 1.4),
  'efficientnet-b4': (1.4, 1.8),
  'efficientnet-b5': (1.6, 2.2),
  'efficientnet-b6': (1.8, 2.6),
  'efficientnet-b7': (2.0, 3.1),
  'efficientnet-lite0': (1.0, 1.0),
  'efficientnet-lite1': (1.0, 1.1),
  'efficientnet-lite2': (1.1, 1.2),
  'efficientnet-lite3': (1.2, 1.4),
  'efficientnet-lite4': (1.4, 1.8),
  # Not an ImageNet architecture: B0's blocks at half width and a third of
  # the depth (10 blocks), for the test suite and configs/demo.py:test,
  # where what is tested is the training system, not the backbone.
  'efficientnet-b0-tiny': (0.5, 0.34),
}

# Stages whose last block is an endpoint (reduction_1..5).
_ENDPOINT_STAGES = (0, 1, 2, 4, 6)


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Official `round_filters` (min_depth = divisor)."""
  filters *= width
  new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
  if new < 0.9 * filters:
    new += divisor
  return int(new)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """Everything the backbone module needs, derived from a backbone name."""

  name: str
  stem_filters: int
  blocks: tuple[BlockArgs, ...]
  # Index (into `blocks`) of the last block of each endpoint stage.
  endpoints: tuple[int, ...]
  is_lite: bool
  survival_prob: float  # backbone drop-connect base; 0 disables it


def backbone_spec(
  name: str, survival_prob: float | None = None
) -> BackboneSpec:
  """Scaled block list of a named backbone.

  Args:
    name: 'efficientnet-b0' ... 'efficientnet-b7', 'efficientnet-lite0..4'.
    survival_prob: drop-connect base survival. None gives the detector's
      official rule: 0 (off) when the name contains 'b0', else 0.8.
  """
  if name not in BACKBONES:
    raise ValueError(f'unknown backbone {name!r}; valid: {sorted(BACKBONES)}')
  width, depth = BACKBONES[name]
  lite = 'lite' in name
  blocks, endpoints = [], []
  for stage, (r, k, s, e, fin, fout, se) in enumerate(_B0_BLOCKS):
    fin, fout = round_filters(fin, width), round_filters(fout, width)
    fixed = lite and stage in (0, len(_B0_BLOCKS) - 1)
    repeats = r if fixed else round_repeats(r, depth)
    for i in range(repeats):
      blocks.append(
        BlockArgs(
          kernel_size=k,
          stride=s if i == 0 else 1,
          expand_ratio=e,
          input_filters=fin if i == 0 else fout,
          output_filters=fout,
          se_ratio=None if lite else se,
          stage=stage,
        )
      )
    if stage in _ENDPOINT_STAGES:
      endpoints.append(len(blocks) - 1)
  if survival_prob is None:
    survival_prob = 0.0 if 'b0' in name else 0.8
  return BackboneSpec(
    name=name,
    stem_filters=32 if lite else round_filters(32, width),
    blocks=tuple(blocks),
    endpoints=tuple(endpoints),
    is_lite=lite,
    survival_prob=survival_prob,
  )


class MBConvBlock(nn.Module):
  """Mobile inverted bottleneck with optional squeeze-excitation
  (official `efficientnet_model.py: MBConvBlock`)."""

  args: BlockArgs
  act: Any
  survival_prob: float
  dtype: Any = jnp.float32

  @nn.compact
  @ops.backend_form('mbconv_block')
  def __call__(self, inputs: Array, train: bool) -> Array:
    a = self.args
    # Official scope names, numbered in order of creation.
    bn_names = iter(
      ['tpu_batch_normalization']
      + [f'tpu_batch_normalization_{i}' for i in (1, 2)]
    )
    conv_names = iter(['conv2d', 'conv2d_1'])
    conv = lambda features: layers.conv(
      features,
      1,
      use_bias=False,
      kernel_init=layers.backbone_conv_init,
      dtype=self.dtype,
      name=next(conv_names),
    )
    bn = lambda act=None: layers.batch_norm(
      train, self.dtype, next(bn_names), act
    )

    x = inputs
    if a.expand_ratio != 1:
      x = conv(inputs.shape[-1] * a.expand_ratio)(x)
      x = bn(self.act)(x)
    x = layers.DepthwiseConv(
      a.kernel_size, a.stride, dtype=self.dtype, name='depthwise_conv2d'
    )(x)
    x = bn(self.act)(x)
    if a.se_ratio is not None and 0 < a.se_ratio <= 1:
      reduced = max(1, int(a.input_filters * a.se_ratio))
      x = SqueezeExcite(reduced, self.act, self.dtype, name='se')(x)
    x = conv(a.output_filters)(x)
    x = bn()(x)
    if a.id_skip and a.stride == 1 and a.input_filters == a.output_filters:
      rng = (
        self.make_rng('dropout')
        if train and 0 < self.survival_prob < 1
        else None
      )
      x = layers.drop_connect(x, self.survival_prob, rng) + inputs
    return x


class SqueezeExcite(nn.Module):
  """SE: mean over H, W -> 1x1 (bias) -> act -> 1x1 (bias) -> sigmoid gate,
  times the input."""

  reduced: int
  act: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    # The squeeze is a mean over many pixels: take it in f32.
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    mk = lambda features, name: layers.conv(
      features,
      1,
      use_bias=True,
      kernel_init=layers.backbone_conv_init,
      dtype=self.dtype,
      name=name,
    )
    s = mk(self.reduced, 'conv2d')(s.astype(self.dtype))
    s = mk(x.shape[-1], 'conv2d_1')(self.act(s))
    return jax.nn.sigmoid(s) * x


class EfficientNet(nn.Module):
  """EfficientNet feature extractor.

  Returns the five endpoints `[reduction_1, ..., reduction_5]` (strides 2,
  4, 8, 16, 32); the detector uses the last three (P3, P4, P5).
  """

  spec: BackboneSpec
  act_type: str = 'swish'
  dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str = 'nothing_saveable'  # layers.REMAT_POLICIES

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> list[Array]:
    act = layers.activation(self.act_type)
    spec = self.spec
    x = x.astype(self.dtype)
    x = Stem(spec.stem_filters, act, self.dtype, name='stem')(x, train)
    endpoints = []
    n = len(spec.blocks)
    drop_rate = 1.0 - spec.survival_prob
    # Gradient checkpointing per block: activations are recomputed in the
    # backward pass instead of stored.
    block_cls = (
      layers.rematerialized(MBConvBlock, self.remat_policy)
      if self.remat
      else MBConvBlock
    )
    for idx, args in enumerate(spec.blocks):
      survival = 1.0 - drop_rate * idx / n if spec.survival_prob else 1.0
      x = block_cls(
        args,
        act,
        survival,
        self.dtype,
        name=f'blocks_{idx}',
      )(x, train)
      if idx in spec.endpoints:
        endpoints.append(x)
    return endpoints


class Stem(nn.Module):
  """3x3 stride-2 conv -> BN -> act (official `efficientnet_model.py:
  Stem`)."""

  filters: int
  act: Any
  dtype: Any = jnp.float32

  @nn.compact
  @ops.backend_form('stem')
  def __call__(self, x: Array, train: bool) -> Array:
    x = layers.conv(
      self.filters,
      3,
      2,
      use_bias=False,
      kernel_init=layers.backbone_conv_init,
      dtype=self.dtype,
      name='conv2d',
    )(x)
    return layers.batch_norm(
      train, self.dtype, 'tpu_batch_normalization', self.act
    )(x)


def endpoint_channels(spec: BackboneSpec) -> Sequence[int]:
  return [spec.blocks[i].output_filters for i in spec.endpoints]
