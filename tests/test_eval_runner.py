"""The evaluation runner end to end with a tiny D0 (128 px, 16 filters, one
BiFPN cell, one head repeat) on the 8 fake CPU devices of conftest."""

import contextlib
import io
import json

import numpy as np
import pytest
from conftest import shared_path
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import effdet_jax
from effdet_jax import config_files
from effdet_jax.data import dataset_checks, label_maps, sources, testing
from effdet_jax.evaluation import coco, runner

EVAL_BATCH = 8  # one image per fake device
NUM_CLASSES = 11  # the bccd subset's largest category id


def _tiny(config):
  m = config.model
  m.fpn_num_filters, m.fpn_cell_repeats, m.box_class_repeats = 16, 1, 1
  m.num_classes = NUM_CLASSES
  config.eval.batch_size = EVAL_BATCH
  return config


@pytest.fixture(scope='module')
def variables():
  """One random-init tiny model for the tests below (init compiles once)."""
  _, out = effdet_jax.create_model(_tiny(testing.small_config()))
  return out


@pytest.fixture(scope='module')
def bccd_subset(tmp_path_factory):
  """10 bccd images (two eval batches, the second padded) with category
  ids 2, 7, 11 instead of 1, 2, 3."""
  src = shared_path('data', 'bccd')
  annotations = shared_path('data', 'bccd', 'annotations.json')
  data = json.loads(annotations.read_text())
  new = {1: 2, 2: 7, 3: 11}
  images = data['images'][:10]
  ids = {im['id'] for im in images}
  subset = {
    'images': images,
    'annotations': [
      dict(a, category_id=new[a['category_id']])
      for a in data['annotations']
      if a['image_id'] in ids
    ],
    'categories': [dict(c, id=new[c['id']]) for c in data['categories']],
  }
  path = tmp_path_factory.mktemp('bccd') / 'subset.json'
  path.write_text(json.dumps(subset))
  return path, src / 'images'


@pytest.mark.slow
def test_coco_json_run_equals_pycocotools_on_written_files(
  bccd_subset, variables, tmp_path
):
  path, images = bccd_subset
  config = _tiny(
    testing.small_config(
      source='coco_json', eval_json=str(path), eval_images=str(images)
    )
  )
  # num_classes 11: our coco_json source keeps the json ids as class ids.
  evaluator = runner.Evaluator(config, str(tmp_path))
  metrics = evaluator.evaluate({'ema': variables}, step=7)
  assert set(coco.METRIC_NAMES) <= set(metrics)

  record = json.loads((tmp_path / 'eval' / 'step_7.json').read_text())
  for key in coco.METRIC_NAMES:
    assert record[key] == metrics[key]
  assert set(record['per_class']) == {'RBC', 'WBC', 'Platelets'}
  dets = json.loads((tmp_path / 'eval' / 'detections_step_7.json').read_text())
  json_ids = {im['id'] for im in json.loads(path.read_text())['images']}
  assert {d['image_id'] for d in dets} == json_ids  # no padding rows
  assert len(dets) == 100 * len(json_ids)  # soft-NMS fills every slot
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(str(path))
    ev = COCOeval(gt, gt.loadRes(dets), 'bbox')
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  ours = [metrics[k] for k in coco.METRIC_NAMES]
  np.testing.assert_allclose(ours, ev.stats, atol=1e-6)


def test_label_map_has_only_the_models_classes(tmp_path):
  """The demo trains 3 classes, and its data.label_map 'shapes' names 4 (a
  'cross' it never trains): evaluation, drawing and the workdir's map see
  the 3 only, so the per-class table has no AP -1 row for 'cross'."""
  config = config_files.load('demo:test')
  config.eval.batch_size = EVAL_BATCH
  assert config.model.num_classes == 3
  assert len(label_maps.load(config.data.label_map)) == 4
  want = {1: 'rectangle', 2: 'ellipse', 3: 'triangle'}
  assert sources.label_map(config) == want
  evaluator = runner.Evaluator(config, None)
  assert evaluator.label_map == want
  categories = evaluator.coco.ground_truth()['categories']
  assert {c['id']: c['name'] for c in categories} == want
  workdir = str(tmp_path / 'w')
  assert dataset_checks.prepare_training(config, workdir).names == want
  assert label_maps.load_workdir(workdir).names == want
  # A workdir saved with all 4 names (before) still resumes.
  label_maps.save_workdir(
    workdir, label_maps.ClassMap.identity(label_maps.SHAPES)
  )
  assert dataset_checks.verify(config, workdir, ('eval',))[0].names == want
  # A map with category ids keeps the pairs of the kept classes.
  cm = label_maps.ClassMap({1: 'a', 2: 'b', 3: 'c'}, {1: 7, 2: 9, 3: 12})
  assert cm.for_model(2) == label_maps.ClassMap({1: 'a', 2: 'b'}, {1: 7, 2: 9})


@pytest.mark.slow
def test_ground_truth_built_from_synthetic_batches(variables):
  """Synthetic shapes (no json): the built ground truth is the source's
  boxes in original pixels (160x96 images in a 128x128 network input, so
  image_scale = 1.25), restricted to the first eval.num_images."""
  config = _tiny(
    testing.small_config(
      synthetic_image_size=(96, 160),
      synthetic_eval_size=12,
      label_map='shapes',
    )
  )
  config.eval.num_images = 10
  evaluator = runner.Evaluator(config, None)
  result = evaluator.run(variables)
  assert result.num_images == 10
  gt = evaluator.coco.ground_truth()
  labels = sources.label_map(config)
  assert {c['id']: c['name'] for c in gt['categories']} == labels

  want, ids = [], []
  raw = sources.raw_examples(config, 'eval').take(10)
  for ex in raw.as_numpy_iterator():
    ids.append(int(ex['image_id']))
    # Independent arithmetic: the pipeline resizes 96x160 to int(96 * 0.8)
    # x int(160 * 0.8) = 76x128 and clips boxes to [0, 127]; the official
    # rule maps them back with image_scale = 1 / 0.8 (so y is off by the
    # int truncation, as officially).
    net = ex['boxes'] * np.array([76, 128, 76, 128])
    net = np.clip(net, 0, 127) * 1.25
    for box, cls in zip(net, ex['classes'], strict=True):
      y0, x0, y1, x1 = box
      want.append((int(ex['image_id']), int(cls), [x0, y0, x1 - x0, y1 - y0]))
  assert [im['id'] for im in gt['images']] == ids
  got = [
    (a['image_id'], a['category_id'], a['bbox']) for a in gt['annotations']
  ]
  assert [g[:2] for g in got] == [w[:2] for w in want]
  np.testing.assert_allclose(
    [g[2] for g in got], [w[2] for w in want], atol=1e-3
  )
  for a in gt['annotations']:
    assert a['area'] == pytest.approx(a['bbox'][2] * a['bbox'][3])


@pytest.mark.slow
def test_evaluate_fn_and_mode_eval_restore_the_same_weights(
  variables, tmp_path
):
  """make_evaluate_fn scores a TrainState; a checkpoint of that state, read
  back by --mode=eval (evaluate_checkpoint) with eval.weights=both, gives the
  same EMA numbers, and its raw weights (different here) other detections."""
  import jax
  import jax.numpy as jnp

  from effdet_jax.runtime import checkpoint
  from effdet_jax.train.state import TrainState

  config = _tiny(
    testing.small_config(synthetic_eval_size=8, label_map='shapes')
  )
  raw = jax.tree.map(lambda x: x * 1.05, variables['params'])
  state = TrainState(
    step=jnp.int32(5),
    params=raw,
    batch_stats=variables['batch_stats'],
    opt_state={},
    ema_params=variables['params'],
    ema_batch_stats=variables['batch_stats'],
    rng=jax.random.PRNGKey(0),
    num_skipped=jnp.int32(0),
    last_skipped_step=jnp.int32(-1),
  )
  workdir = str(tmp_path)
  at_5 = runner.make_evaluate_fn(config, workdir)(state, 5)
  ckpt = checkpoint.Checkpointer(workdir, every_steps=1, keep=2)
  ckpt.save(5, state, force=True)
  ckpt.save(9, state.replace(step=jnp.int32(9)), force=True)
  ckpt.close()

  config.eval.checkpoint_step = 5
  config.eval.weights = 'both'
  metrics = runner.evaluate_checkpoint(config, workdir)
  for key in coco.METRIC_NAMES:
    assert metrics[key] == pytest.approx(at_5[key], abs=1e-12)
    assert f'raw/{key}' in metrics
  record = json.loads((tmp_path / 'eval' / 'step_5.json').read_text())
  assert record['weights'] == 'ema' and set(record['raw']) >= {'AP', 'ARl'}
  assert not (tmp_path / 'eval' / 'step_9.json').exists()
  ema_dets = json.loads(
    (tmp_path / 'eval' / 'detections_step_5.json').read_text()
  )
  raw_dets = json.loads(
    (tmp_path / 'eval' / 'detections_step_5_raw.json').read_text()
  )
  assert len(ema_dets) == len(raw_dets) == 800
  assert ema_dets != raw_dets
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert json.loads(lines[-1])['step'] == 5
  assert 'eval/raw/AP' in json.loads(lines[-1])
