"""`python -m effdet_jax.main --config=configs/d0.py --workdir=DIR [--mode=...]`

Thin entry point (STYLE 1): flags, multi-process initialisation, hide
accelerators from TensorFlow (tf.data only), log the process and its
devices, then `train_and_evaluate(config, workdir)`.
"""

from __future__ import annotations

import logging
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from effdet_jax import compilation_cache, malloc_tuning

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Run config file (configs/*.py).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, logs, metrics.')
_MODE = flags.DEFINE_enum(
  'mode', 'train_and_eval', ['train', 'eval', 'train_and_eval'], 'What to run.'
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0 (multi-process runs).'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process.')
_DISTRIBUTED = flags.DEFINE_bool(
  'distributed',
  False,
  'jax.distributed.initialize() with the cluster auto-detected (every '
  'worker of a TPU pod slice; launch/run.sh passes it).',
)
flags.mark_flags_as_required(['config', 'workdir'])


def _initialize_distributed() -> None:
  """`jax.distributed.initialize()` when this is one of several processes."""
  if _NUM_PROCESSES.value and _NUM_PROCESSES.value > 1:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  elif (
    _DISTRIBUTED.value
    or len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1
  ):
    jax.distributed.initialize()  # TPU pod slice: auto-detected


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Both before any JAX backend starts.
  malloc_tuning.reexec_if_untuned()
  malloc_tuning.dispatch_inline()
  _initialize_distributed()
  import tensorflow as tf  # noqa: PLC0415 - tf.data only, no accelerators

  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
  logging.info(
    'process %d/%d, local devices: %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  from effdet_jax.train import trainer  # noqa: PLC0415

  config, workdir = _CONFIG.value, _WORKDIR.value
  compilation_cache.enable(config)
  if _MODE.value == 'eval':
    from effdet_jax.evaluation import runner  # noqa: PLC0415

    runner.evaluate_checkpoint(config, workdir)
    return
  evaluate_fn = None
  if _MODE.value == 'train_and_eval':
    from effdet_jax.evaluation import runner  # noqa: PLC0415

    evaluate_fn = runner.make_evaluate_fn(config, workdir)
  trainer.train_and_evaluate(config, workdir, evaluate_fn)
  if jax.process_index() == 0:
    _report(config, workdir)


def _report(config, workdir: str) -> None:
  """Final COCO metrics and, when configured, drawn predictions."""
  import glob  # noqa: PLC0415
  import json  # noqa: PLC0415

  evals = glob.glob(os.path.join(workdir, 'eval', 'step_*.json'))
  if evals:
    last = max(evals, key=lambda p: int(p.rsplit('_', 1)[1].split('.')[0]))
    with open(last) as f:
      m = json.load(f)
    keys = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'ARmax100')
    print(f'COCO metrics ({last}):')
    print('  ' + '  '.join(f'{k} {m[k]:.3f}' for k in keys if k in m))
  # Drawing opens the checkpoint through orbax, which synchronises all
  # processes: only a single-process run can do it from process 0 alone.
  if config.eval.draw_predictions > 0 and jax.process_count() == 1:
    from effdet_jax.tools import draw_predictions  # noqa: PLC0415

    out = draw_predictions.draw_eval_predictions(
      config, workdir, config.eval.draw_predictions, config.eval.draw_min_score
    )
    print(f'drawn predictions: {out}')


if __name__ == '__main__':
  app.run(main)
