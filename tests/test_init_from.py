"""Backbone checkpoints (`--source=tf-backbone`) and `config.init_from`.

The backbone-only checkpoint is written here from the backbone part of the
official oracle checkpoint, with the official EfficientNet names (plus the
ImageNet head, a step counter and optimizer slots, as the released
EfficientNet checkpoints have), by TF's SaveV2 op.
"""

import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO
from flax import traverse_util
from train_utils import tiny_config as _tiny_config

import effdet_jax
from effdet_jax.convert import (
  ConversionError,
  convert_tf_backbone,
  tf_checkpoint,
)
from effdet_jax.convert.tf_backbone import ADVPROP_INPUT
from effdet_jax.train import init_from
from effdet_jax.train.trainer import Trainer

BB = 'efficientnet-b0'


def tiny_config(**kw):
  """The tests' tiny detector on the oracle's real b0 backbone."""
  config = _tiny_config(**kw)
  config.model.name, config.model.backbone_name = 'efficientdet-d0', BB
  return config


EMA = '/ExponentialMovingAverage'


def _write_backbone_ckpt(oracle_dir, prefix, rename=lambda n: n):
  """The oracle's `efficientnet-b0/...` tensors (raw + EMA) + extras."""
  reader = tf.train.load_checkpoint(str(oracle_dir / 'tf1_ckpt'))
  values = {
    rename(n): reader.get_tensor(n)
    for n in reader.get_variable_to_shape_map()
    if n.startswith(BB + '/')
  }
  rng = np.random.default_rng(0)
  extras = {  # not used by a detector: ImageNet head, step, RMSProp slots
    f'{BB}/head/conv2d/kernel': (1, 1, 320, 1280),
    f'{BB}/head/tpu_batch_normalization/gamma': (1280,),
    f'{BB}/head/dense/kernel': (1280, 1000),
    f'{BB}/head/dense/bias': (1000,),
    f'{BB}/stem/conv2d/kernel/RMSProp': (3, 3, 3, 32),
  }
  for name, shape in extras.items():
    values[name] = rng.normal(size=shape).astype(np.float32)
  values['global_step'] = np.int64(1000)
  names = sorted(values)  # a name-based (TF1) checkpoint, written eagerly
  tf.raw_ops.SaveV2(
    prefix=str(prefix),
    tensor_names=names,
    shape_and_slices=[''] * len(names),
    tensors=[values[n] for n in names],
  )
  return str(prefix), {n: v for n, v in values.items() if n.endswith(EMA)}


@pytest.fixture(scope='module')
def backbone_ckpt(oracle_dir, tmp_path_factory):
  return _write_backbone_ckpt(
    oracle_dir, tmp_path_factory.mktemp('effnet') / 'model'
  )


@pytest.fixture(scope='module')
def d0_abstract():
  model = effdet_jax.build_model(effdet_jax.model_config('efficientdet-d0'))
  return effdet_jax.api.abstract_variables(model)


def _assert_is_checkpoint_backbone(variables, ema_values):
  names = tf_checkpoint.official_names(variables, BB)
  flat = traverse_util.flatten_dict(jax.device_get(dict(variables)))
  count = 0
  for path, value in flat.items():
    if path[1] == 'backbone':
      np.testing.assert_array_equal(value, ema_values[names[path] + EMA])
      count += 1
  assert count == len(ema_values) == 304  # every backbone tensor of b0
  return count


def test_tf_backbone_reads_every_backbone_tensor(backbone_ckpt, d0_abstract):
  prefix, ema_values = backbone_ckpt
  variables, report = convert_tf_backbone(
    prefix, d0_abstract, BB, with_report=True
  )
  assert set(variables['params']) == {'backbone'}
  assert _assert_is_checkpoint_backbone(variables, ema_values)
  assert len(report.matched) == 304 and not report.fresh


def test_typo_in_scope_is_an_error(oracle_dir, tmp_path, d0_abstract):
  bad_block = lambda n: n.replace(f'{BB}/blocks_3/', f'{BB}/block_3/')
  prefix, _ = _write_backbone_ckpt(oracle_dir, tmp_path / 'a' / 'm', bad_block)
  with pytest.raises(ConversionError) as err:
    convert_tf_backbone(prefix, d0_abstract, BB)
  msg = str(err.value)
  assert 'targets without a source: efficientnet-b0/blocks_3/' in msg
  assert 'unused source tensors: efficientnet-b0/block_3/' in msg

  bad_scope = lambda n: n.replace(BB, 'efficientnet-bO')
  prefix, _ = _write_backbone_ckpt(oracle_dir, tmp_path / 'b' / 'm', bad_scope)
  with pytest.raises(
    ConversionError, match='Top-level scopes in .*efficientnet-bO'
  ):
    convert_tf_backbone(prefix, d0_abstract, BB)


@pytest.mark.slow
def test_backbone_init_from_gives_checkpoint_backbone_and_fresh_rest(
  backbone_ckpt, tmp_path
):
  prefix, ema_values = backbone_ckpt
  config = tiny_config(batch_size=2)
  config.mesh.data = 1
  config.init_from.path = prefix
  config.init_from.kind = 'backbone'
  trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:1])
  state = init_from.initial_state(trainer, config, str(tmp_path))
  report = (tmp_path / init_from.REPORT_FILE).read_text()
  assert 'loaded 304 variables: backbone (304)' in report
  assert 'not loaded, fresh (kind=backbone)' in report

  for ema in (False, True):
    _assert_is_checkpoint_backbone(state.variables(ema), ema_values)

  def not_backbone(tree):
    flat = traverse_util.flatten_dict(tree)
    return {'/'.join(p): v for p, v in flat.items() if p[1] != 'backbone'}

  # The rest equals the trainer's own initialisation, leaf for leaf.
  fresh = not_backbone(trainer.host_state().variables())
  for ema in (False, True):
    got = not_backbone(jax.device_get(state.variables(ema)))
    assert got.keys() == fresh.keys() and len(got) > 50
    for name, value in got.items():
      np.testing.assert_array_equal(value, fresh[name], err_msg=name)
  assert int(state.step) == 0
  assert all(not np.any(x) for x in jax.tree.leaves(state.opt_state))

  # A detector source needs its classifier; a missing one is named.
  config.init_from.kind = 'detector'
  with pytest.raises(ConversionError, match='without a source'):
    init_from.load(
      config.init_from, config.model, trainer.abstract_state.variables()
    )


@pytest.mark.slow
def test_advprop_backbone_is_fed_minus_one_to_one(backbone_ckpt, tmp_path):
  """AdvProp weights want x * 2 / 255 - 1 (official `scale_range` with mean
  0, std 1); `--advprop` records it, init_from enforces it."""
  from effdet_jax.data import preprocess

  params = preprocess.Params(image_size=(4, 4), **ADVPROP_INPUT)
  image = tf.constant([[[0, 255, 51]] * 4] * 4, tf.uint8)
  example = {
    'image': image,
    'boxes': tf.zeros([0, 4]),
    'classes': tf.zeros([0], tf.int32),
    'image_id': 1,
    'is_crowd': tf.zeros([0], tf.bool),
    'area': tf.zeros([0]),
  }
  out = preprocess.eval_preprocess(example, params).get('image').numpy()
  np.testing.assert_allclose(out[0, 0], [-1.0, 1.0, 51 * 2 / 255 - 1], 1e-6)

  prefix, ema_values = backbone_ckpt
  out_dir = tmp_path / 'advprop_b0'
  subprocess.run(
    [
      sys.executable,
      '-m',
      'effdet_jax.convert',
      '--source=tf-backbone',
      '--advprop',
      f'--input={prefix}',
      '--config=configs/d0.py',
      f'--output={out_dir}',
    ],
    check=True,
    cwd=REPO,
    capture_output=True,
  )
  assert (
    'matched 304 variables' in (out_dir / 'conversion_report.txt').read_text()
  )
  config = tiny_config()
  model = effdet_jax.build_model(config.model)
  abstract = effdet_jax.api.abstract_variables(model)
  init = config.init_from
  init.path, init.kind = str(out_dir), 'detector'
  with pytest.raises(ValueError, match="kind='backbone'"):
    init_from.load(init, config.model, abstract)
  init.kind = 'backbone'
  with pytest.raises(ValueError, match='input normalisation.*scale_range'):
    init_from.load(init, config.model, abstract)
  config.model.update(ADVPROP_INPUT)
  loaded, report, fmt = init_from.load(init, config.model, abstract)
  assert fmt == 'converted' and len(report.matched) == 304
  _assert_is_checkpoint_backbone(loaded, ema_values)
