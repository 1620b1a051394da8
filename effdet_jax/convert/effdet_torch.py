"""rwightman's `effdet` (PyTorch) `tf_efficientdet_*` state dicts -> ours.

The `tf_*` models of effdet 0.4.1 are ports of the official weights with TF
SAME padding and the redundant conv biases kept, so they are the same
function; only names and layouts differ (OIHW -> HWIO; depthwise [C,1,k,k]
-> [k,k,C,1]; BN weight/bias/running_* -> scale/bias/mean/var).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from effdet_jax.convert import strict_fill
from effdet_jax.models.efficientnet import BackboneSpec

_BN = {
  'scale': 'weight',
  'bias': 'bias',
  'mean': 'running_mean',
  'var': 'running_var',
}

_EXPAND_BLOCK = {
  'conv2d': 'conv_pw',
  'tpu_batch_normalization': 'bn1',
  'depthwise_conv2d': 'conv_dw',
  'tpu_batch_normalization_1': 'bn2',
  'se/conv2d': 'se.conv_reduce',
  'se/conv2d_1': 'se.conv_expand',
  'conv2d_1': 'conv_pwl',
  'tpu_batch_normalization_2': 'bn3',
}
_PLAIN_BLOCK = {
  'depthwise_conv2d': 'conv_dw',
  'tpu_batch_normalization': 'bn1',
  'se/conv2d': 'se.conv_reduce',
  'se/conv2d_1': 'se.conv_expand',
  'conv2d': 'conv_pw',
  'tpu_batch_normalization_1': 'bn2',
}


def _conv(a: np.ndarray) -> np.ndarray:  # OIHW -> HWIO
  assert a.ndim == 4, a.shape
  return a.transpose(2, 3, 1, 0)


def _depthwise(a: np.ndarray) -> np.ndarray:  # [C,1,kh,kw] -> [kh,kw,C,1]
  assert a.ndim == 4 and a.shape[1] == 1, a.shape
  return a.transpose(2, 3, 0, 1)


def _same(a: np.ndarray) -> np.ndarray:
  return a


def _leaf(module: str, leaf: str, is_bn: bool) -> strict_fill.Rule:
  """Torch name and transform of one of our leaves inside `module`."""
  if is_bn:
    return f'{module}.{_BN[leaf]}', _same
  if leaf == 'kernel':
    return f'{module}.weight', _conv
  if leaf == 'depthwise_kernel':
    return f'{module}.conv_dw.weight', _depthwise
  if leaf == 'pointwise_kernel':
    return f'{module}.conv_pw.weight', _conv
  if leaf == 'bias':
    # Separable convs carry their bias on the pointwise conv.
    return f'{module}.bias', _same
  raise strict_fill.ConversionError(
    f'no effdet name for leaf {leaf!r} in {module}'
  )


def effdet_rule(spec: BackboneSpec, min_level: int, bn_modules: set):
  """Our flattened path -> (effdet state-dict key, transform)."""
  stage_pos = []
  counts: dict[int, int] = {}
  for b in spec.blocks:
    stage_pos.append((b.stage, counts.get(b.stage, 0)))
    counts[b.stage] = counts.get(b.stage, 0) + 1

  def rule(path):
    _, top, *mid, leaf = path
    is_bn = tuple([top, *mid]) in bn_modules
    if top == 'backbone':
      if mid[0] == 'stem':
        module = 'backbone.conv_stem' if mid[1] == 'conv2d' else 'backbone.bn1'
        return _leaf(module, leaf, is_bn)
      k = int(mid[0].split('_')[1])
      stage, j = stage_pos[k]
      table = (
        _EXPAND_BLOCK if spec.blocks[k].expand_ratio != 1 else _PLAIN_BLOCK
      )
      sub = table['/'.join(mid[1:])]
      module = f'backbone.blocks.{stage}.{j}.{sub}'
      if leaf == 'depthwise_kernel':
        return f'{module}.weight', _depthwise
      return _leaf(module, leaf, is_bn)
    if top.startswith('resample_p'):
      idx = int(top[len('resample_p') :]) - min_level
      sub = 'conv' if mid[0] == 'conv2d' else 'bn'
      return _leaf(f'fpn.resample.{idx}.conv.{sub}', leaf, is_bn)
    if top == 'fpn_cells':
      cell, fnode = mid[0].split('_')[1], mid[1][len('fnode') :]
      base = f'fpn.cell.{cell}.fnode.{fnode}'
      if len(mid) == 2:  # WSM, WSM_1, ...: one vector in effdet
        k = 0 if leaf == 'WSM' else int(leaf.split('_')[1])
        return f'{base}.combine.edge_weights', lambda a: np.asarray(a)[k]
      if mid[2].startswith('resample_'):
        fid = mid[2].split('_')[2]
        sub = 'conv' if mid[3] == 'conv2d' else 'bn'
        return _leaf(f'{base}.combine.resample.{fid}.conv.{sub}', leaf, is_bn)
      if mid[2].startswith('op_after_combine'):
        if mid[3] == 'bn':
          return _leaf(f'{base}.after_combine.conv.bn', leaf, is_bn)
        if leaf == 'bias':
          return f'{base}.after_combine.conv.conv_pw.bias', _same
        return _leaf(f'{base}.after_combine.conv', leaf, is_bn)
    if top in ('class_net', 'box_net'):
      name = mid[0]
      m = re.fullmatch(r'(class|box)-(\d+)-bn-(\d+)', name)
      if m:
        i, level = int(m.group(2)), int(m.group(3))
        return _leaf(f'{top}.bn_rep.{i}.{level - min_level}.bn', leaf, is_bn)
      base = (
        f'{top}.predict'
        if name.endswith('-predict')
        else (f'{top}.conv_rep.{name.split("-")[1]}')
      )
      if leaf == 'bias':
        return f'{base}.conv_pw.bias', _same
      return _leaf(base, leaf, is_bn)
    raise strict_fill.ConversionError(f'no effdet name for {"/".join(path)}')

  return rule


def convert_effdet_state_dict(
  state_dict: Mapping[str, np.ndarray],
  abstract: Mapping,
  spec: BackboneSpec,
  min_level: int,
) -> dict:
  """Variables shaped like `abstract` from an effdet `state_dict` (arrays)."""
  from flax import traverse_util

  bn_modules = {
    p[1:-1]
    for p in traverse_util.flatten_dict(dict(abstract))
    if p[0] == 'params' and p[-1] == 'scale'
  }
  arrays = {k: np.asarray(v) for k, v in state_dict.items()}
  return strict_fill.fill(
    abstract,
    effdet_rule(spec, min_level, bn_modules),
    arrays.__getitem__,
    arrays,
    ignore=r'.*num_batches_tracked|anchors\..*|.*\.anchors\.boxes',
  )


def convert_effdet_file(path: str, abstract: Mapping, model) -> dict:
  """Reads a `.pth` state dict (or a checkpoint with 'state_dict')."""
  import torch

  obj = torch.load(path, map_location='cpu', weights_only=True)
  if isinstance(obj, dict) and 'state_dict' in obj:
    obj = obj['state_dict']
  obj = {k.removeprefix('model.'): v.numpy() for k, v in obj.items()}
  return convert_effdet_state_dict(
    obj, abstract, model.backbone, model.min_level
  )
