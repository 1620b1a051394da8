"""`python -m effdet_jax.tools.summary --config=configs/d0.py [--format=json]`

Trainable parameters (total and per part, the split the official counts
use), BN moving statistics, and multiply-adds of one image at the config's
`image_size` counted as the official code does (see `tools/flops.py`).
Nothing is compiled: variables come from `jax.eval_shape`, FLOPs from the
jaxpr, so D7x at 1536 takes seconds.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import traverse_util
from ml_collections import config_flags

from effdet_jax import api, model_checks, registry
from effdet_jax.tools.flops import count_flops

_PARTS = ('backbone', 'resample_p6_p7', 'fpn_cells', 'class_net', 'box_net')


def _part(top: str) -> str:
  return 'resample_p6_p7' if top.startswith('resample_p') else top


def summarize(model_cfg: Any) -> dict[str, Any]:
  """Parameter counts and FLOPs of the model a `model` config describes."""
  cfg = dict(model_cfg)
  # FLOPs are counted on the plain forms (`count_flops` traces with the
  # 'xla' backend: one grouped conv per depthwise conv, as in TF).
  model = api.build_model(cfg)
  variables = api.abstract_variables(model)
  flat = traverse_util.flatten_dict(variables)
  split = dict.fromkeys(_PARTS, 0)
  params = bn_stats = 0
  for path, leaf in flat.items():
    n = int(np.prod(leaf.shape))
    if path[0] == 'params':
      params += n
      split[_part(path[1])] = split.get(_part(path[1]), 0) + n
    else:
      bn_stats += n
  h, w = registry.parse_image_size(cfg['image_size'])
  bn_scopes = [
    'EfficientDet/' + '/'.join(p[1:-1])
    for p in flat
    if p[0] == 'params' and p[-1] == 'scale'
  ]
  swish = cfg['act_type'] in ('swish', 'silu')
  flops = count_flops(
    lambda v, x: model.apply(v, x),
    variables,
    jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32),
    skip_scopes=bn_scopes,
    swish_muls=2 if swish else 1,
  )
  return {
    'model': cfg['name'],
    'image_size': [h, w],
    'params': params,
    'params_split': split,
    'bn_statistics': bn_stats,
    'flops': flops,
  }


def format_table(s: dict[str, Any]) -> str:
  rows = [
    ('model', s['model']),
    ('image size', f'{s["image_size"][0]}x{s["image_size"][1]}'),
    ('trainable params', f'{s["params"]:,}'),
    *((f'  {k}', f'{v:,}') for k, v in s['params_split'].items()),
    ('BN moving statistics', f'{s["bn_statistics"]:,}'),
    ('multiply-adds (FLOPs)', f'{s["flops"]:,} ({s["flops"] / 1e9:.2f}B)'),
  ]
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def _define_flags() -> None:
  """The program's flags; defined only when it runs as a program (absl
  flags are process-global: importing two tools into one process must not
  define --config twice)."""
  config_flags.DEFINE_config_file('config', None, 'Config file.')
  flags.DEFINE_enum('format', 'table', ['table', 'json'], 'Output format.')
  flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  model = flags.FLAGS.config.model
  # A model.name overridden on another model's config would print that
  # name beside this model's counts.
  model_checks.check(model)
  s = summarize(model)
  print(json.dumps(s) if flags.FLAGS.format == 'json' else format_table(s))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
