"""`config.init_from`: start training from pretrained weights.

Distinct from resuming: a workdir with a checkpoint of its own always
resumes itself (trainer.py); only a workdir without one reads `init_from`,
so a preempted finetuning run never goes back to the pretrained weights.

    config.init_from.path           '' = train from scratch
    config.init_from.kind           'detector' | 'backbone'
    config.init_from.ema            True: the EMA weights (official default)
    config.init_from.allow_missing  regex (re.match, official names) of gaps

`path` may be, recognised in this order:
  * a `.h5` file: official Keras weights (`efficientdet-dN.h5`, the EMA
    values; `ema` does not apply);
  * a directory with `model_config.json` and `checkpoints/`: a training
    workdir (latest step; `ema` picks the EMA or the raw variables);
  * a directory with `model_config.json` and `variables/`: the output of
    `python -m effdet_jax.convert` or `effdet_jax.api.save` (one copy, as
    converted; a `--source=tf-backbone` output holds only the backbone, a
    `--source=torch-backbone` output a backbone and fresh rest: both are
    kind='backbone');
  * anything `tf.train.load_checkpoint` opens: an official TF checkpoint
    folder or prefix (detector, or EfficientNet for kind='backbone').

Matching is by official variable name and strict, as in the converters:
every target variable of the loaded part needs a tensor of its shape and
every source tensor of that part a target. Built-in exceptions, all logged:
  * kind='detector': the class-prediction layer
    (`class_net/class-predict/...`) whose shape differs from the source's
    (another `num_classes`) keeps its fresh initialisation (bias -4.6), as
    the official loader skips shape mismatches; its depthwise kernel, whose
    shape does not depend on the classes, is loaded.
  * kind='backbone': only `{backbone}/...` is read; everything else
    (resample_p6, fpn_cells, class_net, box_net) stays fresh, and source
    tensors outside the backbone scope (a detector source) or in the
    ImageNet classifier head are not used.
  * not weights: global_step, optimizer slots, the EMA twin not read.
Loaded values replace params, batch_stats and their EMA copies; the
optimizer state and the step start fresh. The log lists what was loaded and
what was not; the full list goes to `<workdir>/init_from_report.txt`.

Converted and workdir sources carry their `model_config.json`: their input
normalisation (`mean_rgb`, `stddev_rgb`, `scale_range`, e.g. an AdvProp
backbone's [-1, 1]) must equal the run's, else the run stops.
"""

from __future__ import annotations

import collections
import logging
import re
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from effdet_jax import api, files, initialization, model_checks
from effdet_jax.convert import keras_h5, strict_fill, tf_backbone
from effdet_jax.convert import tf_checkpoint as tf_ckpt

KINDS = ('detector', 'backbone')
CLASS_PREDICT = 'class_net/class-predict/'
REPORT_FILE = 'init_from_report.txt'


def source_format(path: str) -> str:
  """'keras' | 'workdir' | 'converted' | 'tf' for an init_from path."""
  from effdet_jax.runtime import checkpoint  # noqa: PLC0415

  if path.endswith('.h5') and files.isfile(path):
    return 'keras'
  if files.isfile(files.join(path, api.MODEL_CONFIG_FILE)):
    if checkpoint.is_training_workdir(path):
      return 'workdir'
    if files.isdir(checkpoint.saved_variables_dir(path)):
      return 'converted'
  import tensorflow as tf  # noqa: PLC0415 - slow import

  try:
    tf.train.load_checkpoint(path)
  except Exception as err:  # noqa: BLE001 - any unreadable path
    raise FileNotFoundError(
      f'init_from.path={path!r} is none of: a .h5 file, a directory written '
      'by `python -m effdet_jax.convert` / effdet_jax.api.save, a training '
      f'workdir, a TF checkpoint ({type(err).__name__}: {err}); a PyTorch '
      '.pth converts first (python -m effdet_jax.convert --source='
      'torch-backbone or effdet)'
    ) from None
  return 'tf'


def _our_tree(path: str, fmt: str, ema: bool) -> tuple[dict, dict]:
  """(variables as saved, model config) of a converted dir or workdir."""
  from effdet_jax.runtime import checkpoint  # noqa: PLC0415

  # A bad file stops here with its path, not as a bare JSON/KeyError.
  cfg = model_checks.read_model_config(files.join(path, api.MODEL_CONFIG_FILE))
  # A converted dir holds one copy; a workdir's EMA variables or its state
  # (the raw weights), as saved (nested dicts).
  item = 'variables' if ema or fmt == 'converted' else 'state'
  try:
    # The newest readable step (a corrupt newest one is named and skipped).
    step, out = checkpoint.restore_read_only(path, {item: None})
  except FileNotFoundError as err:
    raise FileNotFoundError(f'init_from: {err}') from None
  tree = out[item]
  if fmt == 'converted':
    return tree, cfg
  if not ema:
    tree = {'params': tree['params'], 'batch_stats': tree['batch_stats']}
  logging.info('init_from: %s step %d (%s weights)', path, step, item)
  return tree, cfg


def _check_normalisation(src_cfg: dict, model_cfg: Any, path: str) -> None:
  """The weights' input normalisation must be the run's (e.g. AdvProp)."""
  differ = []
  for key in tf_backbone.NORMALISATION_FIELDS:
    theirs, ours = src_cfg.get(key), model_cfg.get(key)
    a = np.broadcast_to(np.asarray(theirs, np.float64), (3,))
    b = np.broadcast_to(np.asarray(ours, np.float64), (3,))
    if not np.allclose(a, b):
      differ.append(f'{key}: weights {theirs} vs run {ours}')
  if differ:
    raise ValueError(
      f'init_from {path}: the weights were made for another input '
      f'normalisation ({"; ".join(differ)}); set config.model.'
      "{mean_rgb,stddev_rgb,scale_range} to the weights' values (AdvProp: "
      'mean 0, std 1, scale_range True)'
    )


def _converted_kind(path: str) -> str:
  """'backbone' for a `--source=tf-backbone`/`torch-backbone` output,
  else 'detector'."""
  info = files.join(path, 'conversion.json')
  if not files.isfile(info):
    return 'detector'
  return files.read_json(info).get('kind', 'detector')


def load(init: Any, model_cfg: Any, abstract: dict):
  """(loaded variables (a part of `abstract`), Report, format).

  Raises ConversionError when the source does not fit (names listed).
  """
  path, kind = files.absolute(init.path), init.kind
  if kind not in KINDS:
    raise ValueError(f'init_from.kind={kind!r}; valid: {KINDS}')
  fmt = source_format(path)
  bb = model_cfg.backbone_name
  scope = bb + '/'
  target = (
    tf_backbone.backbone_part(abstract) if kind == 'backbone' else abstract
  )
  gaps = [init.allow_missing] if init.allow_missing else []
  if kind == 'detector':
    gaps.append(re.escape(CLASS_PREDICT))  # checked after the fill
  gaps = '|'.join(f'(?:{g})' for g in gaps)
  if kind == 'backbone':
    outside = lambda n: not n.startswith(scope) or n.startswith(scope + 'head/')
  else:
    outside = None
  if fmt == 'tf':
    if kind == 'backbone':
      variables, report = tf_backbone.convert_tf_backbone(
        path, abstract, bb, init.ema, gaps, True, with_report=True
      )
    else:
      variables, report = tf_ckpt.convert_tf_checkpoint(
        path, target, bb, init.ema, gaps, None, True
      )
  elif fmt == 'keras':
    if not init.ema:
      logging.warning(
        'init_from: %s holds one copy of the weights (the '
        'official release: EMA); init_from.ema=False ignored',
        path,
      )
    variables, report = keras_h5.convert_keras_h5(
      path, target, bb, gaps, None, True, ignore=outside
    )
  else:
    backbone_only = fmt == 'converted' and _converted_kind(path) == 'backbone'
    if kind == 'detector' and backbone_only:
      raise ValueError(
        f'init_from {path} holds only a pretrained backbone (--source='
        'tf-backbone or torch-backbone); '
        "set init_from.kind='backbone'"
      )
    tree, src_cfg = _our_tree(path, fmt, init.ema)
    _check_normalisation(src_cfg, model_cfg, path)
    names = tf_ckpt.to_official(tree, src_cfg['backbone_name'])
    bn = tf_ckpt.bn_modules(target)

    def rule(p):
      return tf_ckpt.official_name(p, bb, p[1:-1] in bn), lambda a: a

    skip = (lambda n, used: outside(n)) if outside else None
    variables, report = strict_fill.fill_report(
      target, rule, names.__getitem__, names, skip, allow_missing=gaps
    )
  _check_class_predict(report, init.allow_missing)
  return variables, report, fmt


def _check_class_predict(report: strict_fill.Report, user_gaps: str) -> None:
  """Only a shape change of class-predict is a built-in gap."""
  user = re.compile(user_gaps) if user_gaps else None
  bad = [
    f'{name} ({why})'
    for path, name, why in report.fresh
    if path.split('/', 1)[1].startswith(CLASS_PREDICT)
    and why == 'missing'
    and not (user and user.match(name))
  ]
  if bad:
    raise strict_fill.ConversionError(
      f'init_from: the source has no class-prediction layer: '
      f'{strict_fill.preview(bad)}; to train it from scratch, set '
      f"init_from.allow_missing='{CLASS_PREDICT}'"
    )


def _group(paths: list[str], depth: int = 2) -> str:
  """'backbone (213), class_net/class-predict (2)': counts per prefix."""
  counts = collections.Counter(
    '/'.join(p.split('/')[1 : 1 + depth]) for p in paths
  )
  return ', '.join(f'{k} ({v})' for k, v in sorted(counts.items())) or '-'


def summarise(
  report: strict_fill.Report, abstract: dict, kind: str
) -> list[str]:
  """Log lines: what was loaded and what was not (with the reason)."""
  loaded = {p for p, _, _ in report.matched}
  flat = traverse_util.flatten_dict(dict(abstract))
  why = {p: w for p, _, w in report.fresh}
  lines = [f'loaded {len(loaded)} variables: {_group(sorted(loaded), 1)}']
  fresh = ['/'.join(p) for p in flat if '/'.join(p) not in loaded]
  reinit = [
    p
    for p in fresh
    if kind == 'detector' and p.split('/', 1)[1].startswith(CLASS_PREDICT)
  ]
  if reinit:
    shapes = '; '.join(f'{p}: {why.get(p, "")}' for p in sorted(reinit))
    lines.append(
      'class-prediction layer re-initialised (num_classes differs from the '
      f'source): {shapes}'
    )
  other = sorted(set(fresh) - set(reinit))
  if other:
    reason = 'kind=backbone' if kind == 'backbone' else 'allow_missing'
    lines.append(
      f'not loaded, fresh ({reason}): {len(other)} variables: '
      f'{_group(other, 1 if kind == "backbone" else 2)}'
    )
  if report.skipped:
    lines.append(
      f'source tensors not used: {len(report.skipped)}: '
      f'{strict_fill.preview(report.skipped, 6)}'
    )
  return lines


def fresh_state_with(trainer: Any, variables: dict) -> Any:
  """The trainer's fresh state with `variables` (a part of the model's
  variables) in params, batch_stats and their EMA copies.

  The other leaves get exactly the values of `trainer.fresh_state()`; the
  optimizer state is made from the merged params. Host arrays, each placed
  in its sharding: no compiled program.
  """
  loaded = traverse_util.flatten_dict(dict(variables), sep='/')
  host = trainer.host_state(jax.device_get(loaded))
  return initialization.to_device(host, trainer.state_shardings)


def initial_state(trainer: Any, config: Any, workdir: str) -> Any:
  """The fresh state, with `config.init_from` loaded into it when set."""
  init = config.get('init_from')
  if not init or not init.path:
    logging.info('training from scratch')
    return trainer.fresh_state()
  abstract = {
    'params': trainer.abstract_state.params,
    'batch_stats': trainer.abstract_state.batch_stats,
  }
  variables, report, fmt = load(init, config.model, abstract)
  lines = [
    f'init_from {init.path} ({fmt}, kind={init.kind}, ema={init.ema}):'
  ] + summarise(report, abstract, init.kind)
  for line in lines:
    logging.info('%s', line)
  if jax.process_index() == 0:
    files.write_text(
      files.join(workdir, REPORT_FILE),
      '\n'.join(lines + report.lines()) + '\n',
    )
  return fresh_state_with(trainer, variables)
