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
from effdet_jax.convert import convert

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_SOURCE = flags.DEFINE_enum('source', None, ['tf', 'effdet'], 'Source format.')
_INPUT = flags.DEFINE_string('input', None, 'Checkpoint folder or file.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output directory.')
_EMA = flags.DEFINE_bool('ema', True, 'tf: use the EMA shadow weights.')
flags.mark_flags_as_required(['config', 'source', 'input', 'output'])


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
