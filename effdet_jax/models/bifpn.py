"""BiFPN: extra levels P6..P_max and the repeated bidirectional cells.

Facts relied on (official `tf2/efficientdet_keras.py`:
`ResampleFeatureMap`, `FNode`, `OpAfterCombine`, `FPNCell(s)`):
* P6 = [1x1 conv (bias) + BN if channels differ] -> 3x3/2 SAME max-pool on
  backbone P5; P7 (P8) = max-pool of the previous level; no activation.
* Node list from `bifpn_nodes` (top-down then bottom-up); each node resamples
  every input to the size of the cell *input* at its level; a 1x1 conv + BN
  is created per use of an input whose channels differ (cell 0 only).
* Fusion: fastattn (relu weights / (sum + 1e-4)), sum, attn (softmax), and
  the channel-wise variants; then act -> separable 3x3 (bias) -> BN.
* A cell's outputs are, per level, the last node of that level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effdet_jax import ops
from effdet_jax.models import initializers, layers

Array = jax.Array

WEIGHT_METHODS = ('fastattn', 'sum', 'attn', 'channel_attn', 'channel_fastattn')


def bifpn_nodes(min_level: int, max_level: int) -> list[tuple[int, list[int]]]:
  """The official BiFPN node list as (output level, input feature ids).

  Ids 0..L-1 are the cell inputs P_min..P_max; node k gets id L + k. For
  levels 3..7:

      P7 (4) ----------------------------> 12
      P6 (3) ------> 5 ------------------> 11
      P5 (2) ------> 6 ------------------> 10
      P4 (1) ------> 7 ------------------>  9
      P3 (0) ------> 8 (P3 output)
    top-down: 5=[3,4] 6=[2,5] 7=[1,6] 8=[0,7]
    bottom-up: 9=[1,7,8] 10=[2,6,9] 11=[3,5,10] 12=[4,11]
  """
  ids = {lvl: [i] for i, lvl in enumerate(range(min_level, max_level + 1))}
  next_id = max_level - min_level + 1
  nodes = []
  for lvl in range(max_level - 1, min_level - 1, -1):
    nodes.append((lvl, [ids[lvl][-1], ids[lvl + 1][-1]]))
    ids[lvl].append(next_id)
    next_id += 1
  for lvl in range(min_level + 1, max_level + 1):
    nodes.append((lvl, ids[lvl] + [ids[lvl - 1][-1]]))
    ids[lvl].append(next_id)
    next_id += 1
  return nodes


class ResampleFeatureMap(nn.Module):
  """Brings a feature map to a target size and `num_filters` channels.

  Variables (only when the channel count differs): `conv2d/{kernel,bias}`
  and `bn/*`, as the official `resample_*` layers.
  """

  num_filters: int
  apply_bn: bool = True
  conv_after_downsample: bool = False
  dtype: Any = jnp.float32

  def _maybe_1x1(self, x: Array, train: bool) -> Array:
    if x.shape[-1] == self.num_filters:
      return x
    conv = layers.conv(
      self.num_filters,
      1,
      use_bias=True,
      kernel_init=layers.glorot_uniform,
      dtype=self.dtype,
      name='conv2d',
    )
    x = conv(x)
    if self.apply_bn:
      x = layers.batch_norm(train, self.dtype, 'bn')(x)
    return x

  @nn.compact
  def __call__(
    self, x: Array, target_hw: tuple[int, int], train: bool
  ) -> Array:
    h, w = x.shape[1:3]
    th, tw = target_hw
    if h > th and w > tw:
      if not self.conv_after_downsample:
        x = self._maybe_1x1(x, train)
      sh, sw = (h - 1) // th + 1, (w - 1) // tw + 1
      if sh == sw:
        x = layers.max_pool2d(x, sh + 1, sh)
      else:
        x = nn.max_pool(x, (sh + 1, sw + 1), strides=(sh, sw), padding='SAME')
      if self.conv_after_downsample:
        x = self._maybe_1x1(x, train)
    elif h <= th and w <= tw:
      x = self._maybe_1x1(x, train)
      if h < th or w < tw:
        x = layers.resize_nearest_legacy(x, th, tw)
    else:
      raise ValueError(
        f'cannot resample {(h, w)} to {(th, tw)}: larger in one dimension'
        ' and smaller in the other'
      )
    return x


class OpAfterCombine(nn.Module):
  """act -> separable 3x3 (with bias) -> BN; or conv -> BN -> act."""

  num_filters: int
  act: Any
  separable: bool = True
  conv_bn_act_pattern: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    if not self.conv_bn_act_pattern:
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
        kernel_init=layers.glorot_uniform,
        dtype=self.dtype,
        name='conv',
      )
    act = self.act if self.conv_bn_act_pattern else None
    return layers.batch_norm(train, self.dtype, 'bn', act)(conv(x))


def _add_n(xs: Sequence[Array]) -> Array:
  out = xs[0]
  for x in xs[1:]:
    out = out + x
  return out


class FNode(nn.Module):
  """One BiFPN node: resample inputs, fuse them, op-after-combine."""

  level: int
  input_ids: tuple[int, ...]
  node_id: int
  num_filters: int
  weight_method: str
  act: Any
  separable: bool = True
  apply_bn_for_resampling: bool = True
  conv_after_downsample: bool = False
  conv_bn_act_pattern: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  @ops.backend_form('fnode')
  def __call__(
    self, feats: list[Array], target_hw: tuple[int, int], train: bool
  ) -> Array:
    nodes = [
      ResampleFeatureMap(
        self.num_filters,
        self.apply_bn_for_resampling,
        self.conv_after_downsample,
        self.dtype,
        name=f'resample_{pos}_{fid}_{self.node_id}',
      )(feats[fid], target_hw, train)
      for pos, fid in enumerate(self.input_ids)
    ]
    return OpAfterCombine(
      self.num_filters,
      self.act,
      self.separable,
      self.conv_bn_act_pattern,
      self.dtype,
      name=f'op_after_combine{self.node_id}',
    )(self.fuse(nodes), train)

  def fusion_weights(self, n: int) -> list[Array]:
    """The fusion weights of `n` inputs (`WSM`, `WSM_1`, ...), f32."""
    shape = (
      (self.num_filters,) if self.weight_method.startswith('channel_') else ()
    )
    names = ['WSM'] + [f'WSM_{i}' for i in range(1, n)]
    return [
      self.param(name, initializers.ones, shape, jnp.float32) for name in names
    ]

  def fuse(self, nodes: list[Array]) -> Array:
    """The weighted sum of the resampled inputs (official
    `FNode.fuse_features`)."""
    method = self.weight_method
    if method == 'sum':
      return _add_n(nodes)
    weights = [
      w.astype(nodes[0].dtype) for w in self.fusion_weights(len(nodes))
    ]
    if method in ('attn', 'channel_attn'):
      norm = jax.nn.softmax(jnp.stack(weights), axis=0)
      return _add_n([x * norm[i] for i, x in enumerate(nodes)])
    if method in ('fastattn', 'channel_fastattn'):
      weights = [jax.nn.relu(w) for w in weights]
      total = _add_n(weights) + 0.0001
      return _add_n([x * weights[i] / total for i, x in enumerate(nodes)])
    raise ValueError(
      f'unknown fpn_weight_method {method!r}; valid: {WEIGHT_METHODS}'
    )


class FPNCell(nn.Module):
  """One BiFPN cell: runs the nodes in order, returns one map per level."""

  nodes: tuple[tuple[int, tuple[int, ...]], ...]
  min_level: int
  num_filters: int
  weight_method: str
  act: Any
  separable: bool = True
  apply_bn_for_resampling: bool = True
  conv_after_downsample: bool = False
  conv_bn_act_pattern: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: list[Array], train: bool) -> list[Array]:
    num_levels = len(feats)
    sizes = [f.shape[1:3] for f in feats]
    feats = list(feats)
    last = {}
    for j, (lvl, ids) in enumerate(self.nodes):
      node_id = len(feats)
      feats.append(
        FNode(
          level=lvl,
          input_ids=ids,
          node_id=node_id,
          num_filters=self.num_filters,
          weight_method=self.weight_method,
          act=self.act,
          separable=self.separable,
          apply_bn_for_resampling=self.apply_bn_for_resampling,
          conv_after_downsample=self.conv_after_downsample,
          conv_bn_act_pattern=self.conv_bn_act_pattern,
          dtype=self.dtype,
          name=f'fnode{j}',
        )(feats, tuple(sizes[lvl - self.min_level]), train)
      )
      last[lvl] = node_id
    return [feats[last[self.min_level + i]] for i in range(num_levels)]


class FPNCells(nn.Module):
  """`fpn_cell_repeats` cells with separate weights (`cell_0`, ...).

  Input and output: P_min..P_max (the output with `num_filters` channels).
  """

  min_level: int
  max_level: int
  num_filters: int
  cell_repeats: int
  weight_method: str = 'fastattn'
  act_type: str = 'swish'
  separable: bool = True
  apply_bn_for_resampling: bool = True
  conv_after_downsample: bool = False
  conv_bn_act_pattern: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str = 'nothing_saveable'  # layers.REMAT_POLICIES

  @nn.compact
  def __call__(self, feats: list[Array], train: bool = False) -> list[Array]:
    if self.weight_method not in WEIGHT_METHODS:
      raise ValueError(
        f'unknown fpn_weight_method {self.weight_method!r}; '
        f'valid: {WEIGHT_METHODS}'
      )
    act = layers.activation(self.act_type)
    nodes = tuple(
      (lvl, tuple(ids))
      for lvl, ids in bifpn_nodes(self.min_level, self.max_level)
    )
    cell_cls = (
      layers.rematerialized(FPNCell, self.remat_policy)
      if self.remat
      else FPNCell
    )
    for r in range(self.cell_repeats):
      feats = cell_cls(
        nodes=nodes,
        min_level=self.min_level,
        num_filters=self.num_filters,
        weight_method=self.weight_method,
        act=act,
        separable=self.separable,
        apply_bn_for_resampling=self.apply_bn_for_resampling,
        conv_after_downsample=self.conv_after_downsample,
        conv_bn_act_pattern=self.conv_bn_act_pattern,
        dtype=self.dtype,
        name=f'cell_{r}',
      )(feats, train)
    return feats
