"""Finetuning with the official freeze expression (`train.freeze`).

D0 converted from the official oracle checkpoint, a 3-class head
(init_from re-initialises class-predict), BCCD through the coco_json source,
freeze `(efficientnet|fpn_cells|resample_p6)` with frozen BN statistics:
every frozen leaf (params, BN statistics and their EMA) keeps its value bit
for bit, every trainable leaf changes, and the loss falls. The same workdir
then resumes itself instead of re-reading init_from.
"""

import logging

import jax
import numpy as np
import pytest
from conftest import shared_path
from flax import traverse_util

import effdet_jax
from effdet_jax import config_files
from effdet_jax.convert import convert, tf_checkpoint
from effdet_jax.runtime import metrics as metrics_lib
from effdet_jax.train import freeze, init_from
from effdet_jax.train.trainer import train_and_evaluate

# The official example (`efficientdet/README.md`, section "8. Finetune on
# PASCAL VOC 2012 with detector COCO ckpt.").
FREEZE = '(efficientnet|fpn_cells|resample_p6)'
STEPS = 5


@pytest.fixture(scope='module')
def converted(oracle_dir, tmp_path_factory):
  cfg = effdet_jax.model_config('efficientdet-d0')
  variables = convert('tf', str(oracle_dir / 'tf1_ckpt'), cfg)
  out = tmp_path_factory.mktemp('d0_official')
  effdet_jax.api.save(str(out), cfg, variables)
  return out, variables


def _config(bccd, init_path):
  config = config_files.load_module('base').get_config('efficientdet-d0')
  config.model.image_size = (128, 128)
  config.model.num_classes = 3
  d = config.data
  d.source = 'coco_json'
  d.train_json = str(bccd / 'annotations.json')
  d.train_images = str(bccd / 'images')
  d.eval_json, d.eval_images = d.train_json, d.train_images
  t = config.train
  t.batch_size = 2
  t.num_steps = STEPS
  t.lr_warmup_steps = 0
  t.lr_warmup_init = 0.0
  t.lr_decay_method = 'constant'
  t.learning_rate = 0.32  # 0.01 at batch 2
  t.log_every_steps = 1
  t.freeze = FREEZE
  t.freeze_bn_stats = True
  config.init_from.path = str(init_path)
  config.init_from.kind = 'detector'
  config.checkpoint.every_steps = 1000
  config.eval.every_steps = 0
  config.mesh.data = 1
  return config


def _one_bccd_batch(config):
  """One real BCCD batch, repeated: the loss must fall on it."""
  from effdet_jax.data import pipeline

  batch = next(pipeline.train_dataset(config).as_numpy_iterator())
  batch = {k: batch[k] for k in ('image', 'boxes', 'classes')}
  assert (batch['classes'] > 0).sum() > 10  # real cells in it

  def batches(start):
    del start
    while True:
      yield batch

  return batches


@pytest.mark.slow
def test_freeze_changes_only_unfrozen_leaves(converted, tmp_path, caplog):
  bccd = shared_path('data', 'bccd')
  src_dir, src = converted
  config = _config(bccd, src_dir)
  workdir = tmp_path / 'run'
  caplog.set_level(logging.INFO)
  with jax.default_device(jax.devices()[0]):
    state = train_and_evaluate(
      config, str(workdir), batches=_one_bccd_batch(config)
    )
  log = caplog.text
  assert 'class-prediction layer re-initialised' in log
  assert 'parameters frozen' in log and 'trainable' in log
  assert (workdir / init_from.REPORT_FILE).exists()

  # Every leaf: frozen ones bit-equal to the official weights, the others
  # moved (params, BN statistics, and both EMA copies).
  masks = freeze.masks(src, FREEZE, 'efficientnet-b0')
  frozen = traverse_util.flatten_dict(
    {'params': masks[0], 'batch_stats': masks[1]}
  )
  source = traverse_util.flatten_dict(src)
  n_frozen, moved, still = 0, [], []
  for ema in (False, True):
    final = traverse_util.flatten_dict(jax.device_get(state.variables(ema)))
    assert final.keys() == source.keys()
    for path, value in final.items():
      name = '/'.join(path)
      if frozen[path]:
        n_frozen += 1
        np.testing.assert_array_equal(value, source[path], err_msg=name)
      elif 'class-predict' in path and path[-1] != 'depthwise_kernel':
        assert value.shape[-1] == 9 * 3, name  # re-initialised, 3 classes
        if path[-1] == 'bias':  # moved from the constant prior -4.595
          assert np.abs(value + np.log(99.0)).max() > 1e-4, name
      elif np.array_equal(value, source[path]):
        still.append(name)
      else:
        moved.append(name)
  # Trainable kernels all move (gradient + weight decay). Some other
  # trainable leaves may get no gradient here: conv biases right before a BN
  # (cancelled by its mean), BN of box-head levels without a positive anchor.
  assert not [n for n in still if n.endswith('kernel')], still
  assert len(moved) > len(still)
  assert n_frozen == 2 * sum(frozen.values()) and len(moved) > 100

  losses = [
    r['det_loss']
    for r in metrics_lib.read_metrics(str(workdir))
    if 'det_loss' in r
  ]
  assert len(losses) == STEPS
  # Margin: the last step's loss is at most 70% of the first (measured 45%).
  assert losses[-1] <= 0.7 * losses[0], losses

  # init_from reads a training workdir too (EMA or raw copy).
  cfg = config.model
  model = effdet_jax.build_model(cfg)
  abstract = effdet_jax.api.abstract_variables(model)
  for ema in (True, False):
    init = config.init_from.copy_and_resolve_references()
    init.path, init.ema = str(workdir), ema
    loaded, report, fmt = init_from.load(init, cfg, abstract)
    assert fmt == 'workdir' and not report.fresh
    jax.tree.map(
      np.testing.assert_array_equal,
      loaded,
      jax.device_get(state.variables(ema)),
    )

  # The workdir has its own checkpoint now: it resumes, init_from ignored.
  caplog.clear()
  again = train_and_evaluate(
    config, str(workdir), batches=_one_bccd_batch(config)
  )
  assert 'init_from ignored' in caplog.text
  assert int(again.step) == STEPS
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(again.params),
    jax.device_get(state.params),
  )


def test_freeze_official_names_and_errors():
  cfg = effdet_jax.model_config('efficientdet-d0')
  model = effdet_jax.build_model(cfg)
  abstract = effdet_jax.api.abstract_variables(model)
  params, stats = freeze.masks(abstract, FREEZE, 'efficientnet-b0')
  names = tf_checkpoint.official_names(abstract, 'efficientnet-b0')
  for path, name in names.items():
    tree = params if path[0] == 'params' else stats
    is_frozen = traverse_util.flatten_dict(tree)[path[1:]]
    assert is_frozen == (path[1] in ('backbone', 'resample_p6', 'fpn_cells')), (
      name
    )
  # re.match is anchored at the start, as the official code: 'class-predict'
  # alone matches nothing and is an error, not a silent no-op.
  with pytest.raises(ValueError, match='matches no parameter'):
    freeze.masks(abstract, 'class-predict', 'efficientnet-b0')
  params, _ = freeze.masks(
    abstract, 'class_net/class-predict', 'efficientnet-b0'
  )
  frozen = [p for p, f in traverse_util.flatten_dict(params).items() if f]
  assert sorted(p[-1] for p in frozen) == [
    'bias',
    'depthwise_kernel',
    'pointwise_kernel',
  ]
