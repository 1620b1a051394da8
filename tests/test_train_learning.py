"""Learning works: the detection loss falls by at least half within a small
budget, on the synthetic shapes and on the real images of shared/data."""

import numpy as np
import pytest
from conftest import shared_dir

from effdet_jax.train import metrics as metrics_lib
from effdet_jax.train.trainer import train_and_evaluate


def _config(source, **data):
  from configs import demo

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


def _det_losses(workdir):
  rows = [r for r in metrics_lib.read_metrics(str(workdir)) if 'det_loss' in r]
  return [r['det_loss'] for r in rows]


@pytest.mark.parametrize('source', ['synthetic', 'coco_json'])
def test_detection_loss_halves(source, tmp_path):
  if source == 'coco_json':
    root = shared_dir() / 'data' / 'bccd'
    if not root.exists():
      pytest.skip(f'{root} not found')
    config = _config(
      'coco_json',
      train_json=str(root / 'annotations.json'),
      train_images=str(root / 'images'),
      label_map='',
    )
    config.model.num_classes = 3
  else:
    config = _config('synthetic')
  import jax

  with jax.default_device(jax.devices()[0]):
    train_and_evaluate(config, str(tmp_path))
  losses = _det_losses(tmp_path)
  # Margin: the mean of the last 20 steps is at most half the first 10.
  assert np.mean(losses[-2:]) <= 0.5 * losses[0], losses
