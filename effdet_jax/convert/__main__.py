"""`python -m effdet_jax.convert`: weights from other code -> our checkpoint.

  python -m effdet_jax.convert --source=tf --input=CKPT_DIR \
      --config=configs/d0.py --output=OUT_DIR [--ema=true|false]
  python -m effdet_jax.convert --source=effdet --input=STATE_DICT.pth \
      --config=configs/d0.py --output=OUT_DIR

The output opens with `effdet_jax.load(OUT_DIR)`.
"""

from __future__ import annotations

import logging

import jax
from absl import app, flags
from ml_collections import config_flags

from effdet_jax import api
from effdet_jax.convert import effdet_torch, tf_checkpoint

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_SOURCE = flags.DEFINE_enum('source', None, ['tf', 'effdet'], 'Source format.')
_INPUT = flags.DEFINE_string('input', None, 'Checkpoint folder or file.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output directory.')
_EMA = flags.DEFINE_bool('ema', True, 'tf: use the EMA shadow weights.')
flags.mark_flags_as_required(['config', 'source', 'input', 'output'])


def convert(source: str, input_path: str, model_cfg, ema: bool = True) -> dict:
  """Our variables for `model_cfg` read from `input_path`."""
  model = api.build_model(model_cfg)
  abstract = jax.eval_shape(lambda: api.init_variables(model))
  if source == 'tf':
    return tf_checkpoint.convert_tf_checkpoint(
      input_path, abstract, model_cfg.backbone_name, ema=ema
    )
  if source == 'effdet':
    return effdet_torch.convert_effdet_file(input_path, abstract, model)
  raise ValueError(f'unknown source {source!r}')


def main(argv):
  del argv
  cfg = _CONFIG.value.model
  variables = convert(_SOURCE.value, _INPUT.value, cfg, _EMA.value)
  api.save(_OUTPUT.value, cfg, variables)
  n = sum(x.size for x in jax.tree.leaves(variables))
  logging.info('wrote %s (%d values)', _OUTPUT.value, n)
  print(f'converted {_INPUT.value} -> {_OUTPUT.value}: {n} values, all matched')


if __name__ == '__main__':
  app.run(main)
