"""EfficientDet = EfficientNet backbone + extra levels + BiFPN + heads.

Variable tree (official scopes; `backbone` stands for
`efficientnet-bN`):

    backbone/stem/..., backbone/blocks_{k}/...
    resample_p6/{conv2d,bn}            (P7, P8: pooling only, no variables)
    fpn_cells/cell_{r}/fnode{j}/{WSM*, resample_*, op_after_combine{n}}
    class_net/{class-{i}, class-{i}-bn-{level}, class-predict}
    box_net/{box-{i}, box-{i}-bn-{level}, box-predict}
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effdet_jax.models import bifpn, efficientnet, heads

Array = jax.Array


class EfficientDet(nn.Module):
  """The detection network (no anchors, no post-processing).

  `apply(variables, images, train=False)` takes normalised NHWC float images
  of any size >= 2**max_level and returns `(class_outputs, box_outputs)`:
  lists over levels min..max of `[B, H_l, W_l, A*num_classes]` and
  `[B, H_l, W_l, A*4]` (channel = anchor * C + class; anchor * 4 + k), in
  float32. Train mode needs a 'dropout' rng when drop-connect is active and
  returns updated `batch_stats` when called with `mutable=['batch_stats']`.
  """

  backbone: efficientnet.BackboneSpec
  num_classes: int = 90
  num_anchors: int = 9
  min_level: int = 3
  max_level: int = 7
  fpn_num_filters: int = 64
  fpn_cell_repeats: int = 3
  box_class_repeats: int = 3
  fpn_weight_method: str = 'fastattn'
  act_type: str = 'swish'
  separable_conv: bool = True
  apply_bn_for_resampling: bool = True
  conv_after_downsample: bool = False
  conv_bn_act_pattern: bool = False
  head_survival_prob: float | None = None
  dtype: Any = jnp.float32
  remat: bool = False  # recompute backbone blocks and BiFPN cells in backprop
  remat_policy: str = (
    'nothing_saveable'  # what they keep: layers.REMAT_POLICIES
  )

  def check_input(self, shape: tuple[int, ...]) -> None:
    """Raises ValueError for an image batch the network cannot take."""
    if len(shape) != 4 or shape[-1] != 3:
      raise ValueError(
        f'images must be [B, H, W, 3] (NHWC, RGB); got shape {tuple(shape)}'
      )
    smallest = 2**self.max_level
    if shape[1] < smallest or shape[2] < smallest:
      raise ValueError(
        f'images of {shape[1]}x{shape[2]} are smaller than 2**max_level = '
        f'{smallest} in a dimension; use an input of at least '
        f'{smallest}x{smallest}'
      )

  @nn.compact
  def __call__(
    self, images: Array, train: bool = False
  ) -> tuple[list[Array], list[Array]]:
    self.check_input(images.shape)
    if self.min_level < 3 or self.min_level > 5:
      raise ValueError('min_level must be within the backbone levels 3..5')
    feats = efficientnet.EfficientNet(
      self.backbone,
      self.act_type,
      self.dtype,
      self.remat,
      self.remat_policy,
      name='backbone',
    )(images, train)
    # Endpoints are reduction_1..5; levels min..5 come from the backbone.
    feats = feats[self.min_level - 1 :]
    for lvl in range(6, self.max_level + 1):
      prev = feats[-1]
      target = (-(-prev.shape[1] // 2), -(-prev.shape[2] // 2))
      feats.append(
        bifpn.ResampleFeatureMap(
          self.fpn_num_filters,
          self.apply_bn_for_resampling,
          self.conv_after_downsample,
          self.dtype,
          name=f'resample_p{lvl}',
        )(prev, target, train)
      )
    feats = bifpn.FPNCells(
      min_level=self.min_level,
      max_level=self.max_level,
      num_filters=self.fpn_num_filters,
      cell_repeats=self.fpn_cell_repeats,
      weight_method=self.fpn_weight_method,
      act_type=self.act_type,
      separable=self.separable_conv,
      apply_bn_for_resampling=self.apply_bn_for_resampling,
      conv_after_downsample=self.conv_after_downsample,
      conv_bn_act_pattern=self.conv_bn_act_pattern,
      dtype=self.dtype,
      remat=self.remat,
      remat_policy=self.remat_policy,
      name='fpn_cells',
    )(feats, train)
    head = lambda prefix, outputs, bias: heads.HeadNet(
      prefix=prefix,
      num_outputs=outputs,
      num_filters=self.fpn_num_filters,
      repeats=self.box_class_repeats,
      min_level=self.min_level,
      act_type=self.act_type,
      separable=self.separable_conv,
      survival_prob=self.head_survival_prob,
      bias_init_value=bias,
      dtype=self.dtype,
      name=f'{prefix}_net',
    )
    class_outputs = head(
      'class', self.num_anchors * self.num_classes, heads.class_bias_init()
    )(feats, train)
    box_outputs = head('box', self.num_anchors * 4, 0.0)(feats, train)
    f32 = lambda xs: [x.astype(jnp.float32) for x in xs]
    return f32(class_outputs), f32(box_outputs)
