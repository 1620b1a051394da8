"""One train step from the official oracle weights vs the official formulas.

The loss parts are recomputed here in numpy from
`efficientdet/det_model_fn.py: detection_loss` (`focal_loss`, `_box_loss`,
the normaliser), the weight decay from the checkpoint's own variable names
(`.*kernel$`, `reg_l2_loss`), and the learning rate from
`learning_rate_schedule` — independently of
`effdet_jax/detection/losses.py` and `train/optimizer.py`.
"""

import math

import jax
import numpy as np
import pytest

from effdet_jax import config_files, ops
from effdet_jax.convert import convert
from effdet_jax.detection import levels, targets
from effdet_jax.train import init_from
from effdet_jax.train.trainer import Trainer


def _np_losses(cls, box, cls_t, box_t, num_pos, num_classes):
  n = num_pos.sum() + 1.0
  y = np.eye(num_classes)[np.maximum(cls_t, 0)] * (cls_t >= 0)[..., None]
  p = 1 / (1 + np.exp(-cls))
  p_t = y * p + (1 - y) * (1 - p)
  alpha_t = y * 0.25 + (1 - y) * 0.75
  ce = np.maximum(cls, 0) - cls * y + np.log1p(np.exp(-np.abs(cls)))
  cls_loss = np.sum(alpha_t * (1 - p_t) ** 1.5 * ce) / n
  e = box - box_t
  hub = np.where(np.abs(e) <= 0.1, 0.5 * e**2, 0.1 * np.abs(e) - 0.005)
  box_loss = np.sum(hub * (box_t != 0)) / (4 * n)
  return cls_loss, box_loss


@pytest.mark.slow
def test_train_step_matches_official_formulas(oracle_dir, tmp_path):
  """The plain forms (backend 'xla', what TPUs and GPUs run). The CPU
  package's forms equal these form by form (tests/test_native_kernels.py:
  focal loss, matcher, the model's train-mode gradients), so a second
  real-size compile here would check nothing new."""
  with ops.use_backend('xla'):
    _check_train_step(oracle_dir, tmp_path)


def _check_train_step(oracle_dir, tmp_path):
  import tensorflow as tf

  config = config_files.load_module('base').get_config('efficientdet-d0')
  config.model.image_size = (256, 256)
  config.train.batch_size = 2
  config.train.num_steps = 1000
  config.train.lr_warmup_steps = 100
  config.mesh.data = 1
  tr = Trainer(config, str(tmp_path), devices=jax.devices()[:1])
  official = convert('tf', str(oracle_dir / 'tf1_ckpt'), config.model)
  # The official weights in params, batch_stats and their EMA copies (the
  # replaced initialisers are dead code: no full init is compiled).
  state = init_from.fresh_state_with(tr, official)
  rng = np.random.default_rng(0)
  image = np.concatenate(
    [np.load(oracle_dir / 'input.npy'), rng.normal(size=(1, 256, 256, 3))]
  ).astype(np.float32)
  boxes = np.full((2, 100, 4), -1.0, np.float32)
  classes = -np.ones((2, 100), np.int32)
  boxes[0, :3] = [[10, 20, 90, 120], [100, 100, 200, 180], [5, 150, 60, 250]]
  classes[0, :3] = [1, 18, 90]
  boxes[1, :1] = [[30, 30, 220, 200]]
  classes[1, :1] = [62]
  batch = {'image': image, 'boxes': boxes, 'classes': classes}
  # The step the trainer runs (packed state).
  _, metrics = tr.loop_step_fn(batch)(tr.to_loop(state), batch)
  metrics = jax.device_get(metrics)

  # Reference: train-mode forward (batch statistics), our matcher (checked
  # against effdet elsewhere), the official loss formulas in numpy.
  @jax.jit  # one program, not an eager op-by-op D0
  def reference(variables, image, boxes, classes):
    (cls_out, box_out), _ = tr.model.apply(
      variables, image, train=True, mutable=['batch_stats']
    )
    return (
      levels.merge_levels(cls_out, 90),
      levels.merge_levels(box_out, 4),
      targets.assign(tr.anchors, boxes, classes),
    )

  cls, box, t = jax.device_get(
    reference(
      {'params': official['params'], 'batch_stats': official['batch_stats']},
      image,
      boxes,
      classes,
    )
  )
  cls, box = np.asarray(cls, np.float64), np.asarray(box, np.float64)
  cls_loss, box_loss = _np_losses(
    cls, box, t.cls_targets, t.box_targets, t.num_positives, 90
  )
  assert metrics['cls_loss'] == pytest.approx(cls_loss, rel=1e-5)
  assert metrics['box_loss'] == pytest.approx(box_loss, rel=1e-5)
  assert metrics['det_loss'] == pytest.approx(
    cls_loss + 50 * box_loss, rel=1e-5
  )

  reader = tf.train.load_checkpoint(str(oracle_dir / 'tf1_ckpt'))
  suffix = '/ExponentialMovingAverage'
  l2 = sum(
    0.5 * np.sum(np.square(reader.get_tensor(name).astype(np.float64)))
    for name in reader.get_variable_to_shape_map()
    if name.endswith('kernel' + suffix)
  )
  assert metrics['weight_decay'] == pytest.approx(4e-5 * l2, rel=1e-5)

  # `efficientdet/det_model_fn.py: update_learning_rate_schedule_parameters`
  # with batch 2: lr 0.08 * 2/64, warmup init scaled too (TF1).
  steps = tr.steps
  lr, warm = 0.08 * 2 / 64, 0.008 * 2 / 64
  assert metrics['learning_rate'] == pytest.approx(warm, rel=1e-6)
  denom = steps.total - steps.warmup
  for step in (steps.warmup, steps.total // 2, steps.total - 1):
    want = 0.5 * lr * (1 + math.cos(math.pi * step / denom))
    assert float(tr.lr_fn(step)) == pytest.approx(want, rel=1e-5, abs=1e-12)
