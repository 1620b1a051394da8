"""Tiny configs and fixed batches for the training-system tests."""

import sys

import numpy as np

from effdet_jax import config_files

base = config_files.load_module('base')


def tiny_config(batch_size=8, image=64, **train):
  """D0's structure, small: the efficientnet-b0-tiny backbone (10 blocks,
  half width), one 16-filter BiFPN cell over P3-P5, one-layer heads."""
  config = base.get_config('efficientdet-d0')
  m = config.model
  m.name, m.backbone_name = 'efficientdet-tiny', 'efficientnet-b0-tiny'
  m.image_size = (image, image)
  m.max_level = 5  # P3..P5: inputs from 32 px
  m.num_classes = 3
  m.fpn_num_filters, m.fpn_cell_repeats, m.box_class_repeats = 16, 1, 1
  t = config.train
  t.batch_size = batch_size
  t.num_steps = 10
  t.lr_warmup_steps = 2
  t.learning_rate = 0.64  # 0.08 at batch 8: updates well above f32 noise
  t.log_every_steps = 1
  for k, v in train.items():
    t[k] = v
  config.mesh.data = -1
  return config


def fixed_batch(config, seed=0):
  """Random images with 1-4 boxes each (1-based classes, -1 padding)."""
  rng = np.random.default_rng(seed)
  b = config.train.batch_size
  h, w = config.model.image_size
  boxes = np.zeros((b, 10, 4), np.float32)
  classes = -np.ones((b, 10), np.int32)
  for i in range(b):
    n = rng.integers(1, 5)
    yx = rng.uniform(0, h * 0.6, (n, 2))
    hw = rng.uniform(h * 0.15, h * 0.4, (n, 2))
    boxes[i, :n] = np.concatenate([yx, yx + hw], 1)
    classes[i, :n] = rng.integers(1, config.model.num_classes + 1, n)
  image = rng.normal(size=(b, h, w, 3)).astype(np.float32)
  return {'image': image, 'boxes': boxes, 'classes': classes}


def demo_cli(workdir, *extra):
  """`python -m effdet_jax.main` training configs/demo.py:test in `workdir`."""
  return [
    sys.executable,
    '-m',
    'effdet_jax.main',
    '--config=configs/demo.py:test',
    f'--workdir={workdir}',
    '--mode=train',
    *extra,
  ]
