"""A `model` config section that cannot be what it says fails early.

Two ways in, both checked before anything is compiled, each failing with a
message that names the cause and the fix:

* a run config's `model` section (`check`, called by the start-up checks
  of training, evaluation and inspect_data, `data/dataset_checks.verify`):
  a `model.name` overridden on another model's config file
  (`--config=configs/d0.py --config.model.name=efficientdet-d3` would only
  relabel D0), and an `image_size` the network cannot take;
* a saved `model_config.json` (`read_model_config`): invalid JSON, or a
  missing or unknown field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from effdet_jax import files, registry

# Fields a saved model config may lack: read with a default (api.build_model,
# inference) or not read at all ('name').
OPTIONAL_FIELDS = (
  'name',
  'dtype',
  'survival_prob',
  'backbone_survival_prob',
  'depthwise_impl',
  'scale_range',
)
# Fields json stores as lists that the model code expects as tuples.
_TUPLE_FIELDS = ('image_size', 'aspect_ratios', 'mean_rgb', 'stddev_rgb')


def _config_file(name: str) -> str:
  return 'configs/' + name.removeprefix('efficientdet-') + '.py'


def check_name(model: Mapping[str, Any]) -> None:
  """Raises ValueError when `model.name` is a registered model whose
  backbone is not `model.backbone_name`: the name was overridden on
  another model's config, which changes the label and nothing else.

  A name the registry does not know is a free label and passes; so does a
  registered name whose backbone matches (overriding e.g. the image size or
  the BiFPN width of a model is allowed).
  """
  name = model.get('name')
  if name not in registry.model_names():
    return
  want = registry.get_model_params(name)['backbone_name']
  have = model.get('backbone_name')
  if have != want:
    raise ValueError(
      f'model.name={name!r} but model.backbone_name={have!r} ({name} has '
      f"{want!r}): overriding model.name on another model's config file "
      "changes only the label, not the model. Use that model's config file "
      f'instead: --config={_config_file(name)}'
    )


def check_image_size(model: Any) -> None:
  """Checks `model.image_size`: (H, W) or one int n for (n, n). The 1-tuple
  `--config.model.image_size=512` gives on the command line becomes
  (n, n) in place. Raises ValueError for a size that is not positive
  integers or is smaller than 2**max_level in a dimension (the network's
  coarsest level needs one pixel; the model itself would only say so
  while tracing, after the data and the state are set up)."""
  size = model.get('image_size')
  pair = size
  if isinstance(size, (tuple, list)) and len(size) == 1:
    pair = (size[0], size[0])
  elif isinstance(size, int):
    # Left as it is (a ConfigDict field of type int cannot hold a tuple):
    # the data, model and evaluation code take an int too.
    pair = (size, size)
  if not (
    isinstance(pair, (tuple, list))
    and len(pair) == 2
    and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
    and min(pair) > 0
  ):
    raise ValueError(
      f'model.image_size={size!r} must be (H, W) positive integers or one '
      "integer n for (n, n), e.g. --config.model.image_size='(512, 512)' "
      'or =512'
    )
  smallest = 2 ** int(model['max_level'])
  if min(pair) < smallest:
    raise ValueError(
      f'model.image_size={tuple(pair)} is smaller than 2**max_level = '
      f'{smallest} (max_level={model["max_level"]}) in a dimension; use at '
      f"least ({smallest}, {smallest}) (the models' own sizes: "
      'effdet_jax/registry.py)'
    )
  if pair is not size and not isinstance(size, int):
    model['image_size'] = tuple(pair)


def check(model: Any) -> None:
  """All start-up checks of a run config's `model` section (ConfigDict or
  dict; `image_size` may be rewritten to (n, n) in place)."""
  check_name(model)
  check_image_size(model)


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
  """The model section saved in `path` (a `model_config.json`).

  Lists become tuples where the model code expects them. Raises
  ValueError naming the file for invalid JSON, a value that is not an
  object, or fields that are missing or unknown (a file of another program
  or version: the message lists the valid fields).
  """
  from effdet_jax import api  # noqa: PLC0415 - api reads files with this

  path = os.fspath(path)
  text = files.read_text(path)  # a local path or a URL
  try:
    cfg = json.loads(text)
  except json.JSONDecodeError as err:
    raise ValueError(
      f'{path} is not valid JSON ({err}); it should be the model section '
      'that effdet_jax.api.save or a training run writes: rewrite it, or '
      'save the model again'
    ) from None
  if not isinstance(cfg, dict):
    raise ValueError(
      f'{path} holds a JSON {type(cfg).__name__}, not an object of model '
      'fields ({"backbone_name": ..., "num_classes": ..., ...})'
    )
  valid = set(api.model_config('efficientdet-d0'))
  unknown = sorted(set(cfg) - valid)
  missing = sorted(valid - set(OPTIONAL_FIELDS) - set(cfg))
  problems = []
  if missing:
    problems.append(f'missing fields {missing}')
  if unknown:
    problems.append(f'unknown fields {unknown}')
  if problems:
    raise ValueError(
      f'{path}: {"; ".join(problems)} (valid fields: {sorted(valid)}). '
      'Fix the file, or save the model again (effdet_jax.api.save)'
    )
  for key in _TUPLE_FIELDS:
    if isinstance(cfg.get(key), list):
      cfg[key] = tuple(cfg[key])
  return cfg
