"""Learning works: the detection loss falls by at least half within a small
budget, on the synthetic shapes and on the real images of shared/data."""

import logging
import re

import numpy as np
import pytest
from conftest import shared_path

from effdet_jax import config_files
from effdet_jax.runtime import metrics as metrics_lib
from effdet_jax.train.trainer import train_and_evaluate


def _config(source, **data):
  demo = config_files.load_module('demo')

  config = demo.get_config('test')
  config.data.source = source
  for k, v in data.items():
    config.data[k] = v
  t = config.train
  t.batch_size = 8
  t.num_steps = 120
  t.lr_warmup_steps = 10
  t.learning_rate = 0.64  # 0.08 at batch 8
  t.log_every_steps = 10
  config.checkpoint.every_steps = 1000
  config.eval.every_steps = 0
  config.mesh.data = 1
  return config


class _CompileLog(logging.Handler):
  """Collects the names of the XLA programs compiled (jax.log_compiles)."""

  def __init__(self, names):
    super().__init__(logging.DEBUG)
    self.names = names

  def emit(self, record):
    message = record.getMessage()
    m = re.match(r'Finished XLA compilation of (\S+)', message)
    if m:
      self.names.append(m.group(1))
    if message == 'training step: loaded':  # from the executable cache
      self.names.append('loaded(train_step)')


def _det_losses(workdir):
  rows = [r for r in metrics_lib.read_metrics(str(workdir)) if 'det_loss' in r]
  return [r['det_loss'] for r in rows]


@pytest.mark.parametrize('source', ['synthetic', 'coco_json'])
@pytest.mark.slow
def test_detection_loss_halves(source, tmp_path):
  if source == 'coco_json':
    root = shared_path('data', 'bccd')
    config = _config(
      'coco_json',
      train_json=str(root / 'annotations.json'),
      train_images=str(root / 'images'),
      label_map='',
    )
    config.model.num_classes = 3
  else:
    config = _config('synthetic')
    # Two evaluations whose last batch is partly padding (13 = 8 + 5).
    config.eval.every_steps = 60
    config.eval.num_images = 13
  import jax

  evaluate_fn = None
  if source == 'synthetic':
    from effdet_jax.evaluation import runner

    evaluate_fn = runner.make_evaluate_fn(config, str(tmp_path))
  compiled = []
  handler = _CompileLog(compiled)
  logger = logging.getLogger()  # jax's and the trainer's records reach it
  logger.addHandler(handler)
  level = logger.level
  logger.setLevel(logging.INFO)
  # The global flag, not the thread-local context: the step is compiled in
  # a background thread (train/step_compile.py).
  jax.config.update('jax_log_compiles', True)
  try:
    with jax.default_device(jax.devices()[0]):
      train_and_evaluate(config, str(tmp_path), evaluate_fn)
  finally:
    jax.config.update('jax_log_compiles', False)
    logger.setLevel(level)
    logger.removeHandler(handler)
  # No recompilation: one program for the step (compiled, or loaded from
  # the executable cache), one for eval detection, whatever the step or the
  # number of valid images in a batch.
  steps = compiled.count('jit(train_step)') + compiled.count(
    'loaded(train_step)'
  )
  assert steps == 1, compiled
  if source == 'synthetic':
    assert compiled.count('jit(detect)') == 1, compiled
  losses = _det_losses(tmp_path)
  # Margin: the mean of the last 20 steps is at most half the first 10.
  assert np.mean(losses[-2:]) <= 0.5 * losses[0], losses
