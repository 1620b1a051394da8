"""COCOEvaluator against pycocotools run directly on the same json.

Data: the real annotations in shared/data (coco128: COCO ids 1..90 with
crowd boxes; bccd: 3 VOC-style classes, area = w * h).
"""

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from conftest import shared_path
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from effdet_jax.evaluation import coco

DATASETS = ('coco128', 'bccd')


def _annotations(name: str) -> dict:
  path = shared_path('data', name, 'annotations.json')
  return json.loads(path.read_text())


def _jittered(dataset: dict, seed: int, max_dets: int = 100) -> list[dict]:
  """COCO result dicts: every ground-truth box moved by up to 15 % of its
  size, with random scores, plus a few pure false positives per image."""
  rng = np.random.default_rng(seed)
  out = []
  for ann in dataset['annotations']:
    x, y, w, h = ann['bbox']
    dx, dy, dw, dh = rng.uniform(-0.15, 0.15, 4) * [w, h, w, h]
    out.append(
      {
        'image_id': ann['image_id'],
        'category_id': ann['category_id'],
        'bbox': [x + dx, y + dy, max(w + dw, 0.5), max(h + dh, 0.5)],
        'score': float(rng.uniform(0.05, 1.0)),
      }
    )
  cats = [c['id'] for c in dataset['categories']]
  for image in dataset['images']:
    for _ in range(3):
      w, h = rng.uniform(5, 100, 2)
      out.append(
        {
          'image_id': image['id'],
          'category_id': int(rng.choice(cats)),
          'bbox': [
            float(rng.uniform(0, image['width'] - w)),
            float(rng.uniform(0, image['height'] - h)),
            float(w),
            float(h),
          ],
          'score': float(rng.uniform(0.0, 0.5)),
        }
      )
  return out


def _as_batch(dataset: dict, results: list[dict], category_to_class=None):
  """COCO results -> the evaluator's input: per image yxyx boxes, scores,
  classes ([B, K], -1 padded), as post-processing produces them."""
  ids = [im['id'] for im in dataset['images']]
  rows = {i: [] for i in ids}
  for r in results:
    rows[r['image_id']].append(r)
  k = max(len(v) for v in rows.values())
  boxes = np.zeros([len(ids), k, 4])
  scores = np.zeros([len(ids), k])
  classes = -np.ones([len(ids), k], np.int64)
  for i, image_id in enumerate(ids):
    for j, r in enumerate(rows[image_id]):
      x, y, w, h = r['bbox']
      boxes[i, j] = [y, x, y + h, x + w]
      scores[i, j] = r['score']
      c = r['category_id']
      classes[i, j] = category_to_class[c] if category_to_class else c
  return np.array(ids), boxes, scores, classes


def _pycocotools(dataset: dict, results: list[dict]) -> COCOeval:
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = copy.deepcopy(dataset)
    gt.createIndex()
    dt = gt.loadRes(copy.deepcopy(results))
    ev = COCOeval(gt, dt, 'bbox')
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev


def _evaluate(dataset, results, **kw) -> coco.EvalResult:
  evaluator = coco.COCOEvaluator(copy.deepcopy(dataset), **kw)
  evaluator.add_detections(*_as_batch(dataset, results))
  return evaluator.evaluate()


def test_ground_truth_fed_back_scores_one():
  dataset = _annotations('coco128')
  results = [
    {
      'image_id': a['image_id'],
      'category_id': a['category_id'],
      'bbox': a['bbox'],
      'score': 1.0,
    }
    for a in dataset['annotations']
  ]
  result = _evaluate(dataset, results)
  for name in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'ARmax100'):
    assert result.metrics[name] == pytest.approx(1.0, abs=1e-12), name
  assert set(result.metrics) == set(coco.METRIC_NAMES)
  present = {a['category_id'] for a in dataset['annotations']}
  names = {c['id']: c['name'] for c in dataset['categories']}
  for cat, name in names.items():
    want = 1.0 if cat in present else -1.0
    assert result.per_class[name] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize('name', DATASETS)
@pytest.mark.slow
def test_jittered_equals_pycocotools_directly(name, tmp_path):
  dataset = _annotations(name)
  results = _jittered(dataset, seed=1)
  result = _evaluate(dataset, results)
  # Our detections json, loaded by pycocotools the ordinary way.
  path = tmp_path / 'dets.json'
  path.write_text(json.dumps(result.detections))
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(str(shared_path('data', name, 'annotations.json')))
    ev = COCOeval(gt, gt.loadRes(str(path)), 'bbox')
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  reference = _pycocotools(dataset, results)
  np.testing.assert_allclose(ev.stats, reference.stats, atol=1e-12)
  ours = [result.metrics[k] for k in coco.METRIC_NAMES]
  np.testing.assert_allclose(ours, reference.stats, atol=1e-6)
  assert 0.2 < result.metrics['AP'] < 0.95  # the jitter really bites
  # Per-class AP by hand from pycocotools' precision array.
  precision = reference.eval['precision']
  for k, cat in enumerate(reference.params.catIds):
    p = precision[:, :, k, 0, -1]
    want = p[p > -1].mean() if (p > -1).any() else -1.0
    cat_name = gt.cats[cat]['name']
    assert result.per_class[cat_name] == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize('name', DATASETS)
def test_faster_backend_equals_pycocotools(name):
  pytest.importorskip('faster_coco_eval')
  dataset = _annotations(name)
  results = _jittered(dataset, seed=2)
  fast = _evaluate(dataset, results, backend='faster_coco_eval')
  slow = _evaluate(dataset, results)
  for key in coco.METRIC_NAMES:
    assert fast.metrics[key] == pytest.approx(slow.metrics[key], abs=1e-4)
  for key, value in slow.per_class.items():
    assert fast.per_class[key] == pytest.approx(value, abs=1e-4)


def _remapped_bccd(ids=(2, 7, 11)) -> dict:
  """bccd with non-contiguous category ids (RBC 2, WBC 7, Platelets 11)."""
  dataset = copy.deepcopy(_annotations('bccd'))
  new = dict(zip((1, 2, 3), ids, strict=True))
  for c in dataset['categories']:
    c['id'] = new[c['id']]
  for a in dataset['annotations']:
    a['category_id'] = new[a['category_id']]
  return dataset


def test_non_contiguous_category_ids_through_a_label_map():
  """A model with 3 classes (1..3) scored against a json whose categories
  are 2, 7, 11: detections are mapped class -> category id."""
  dataset = _remapped_bccd()
  results = _jittered(dataset, seed=3)
  to_class = {2: 1, 7: 2, 11: 3}
  evaluator = coco.COCOEvaluator(
    copy.deepcopy(dataset), class_to_category={1: 2, 2: 7, 3: 11}
  )
  evaluator.add_detections(*_as_batch(dataset, results, to_class))
  result = evaluator.evaluate()
  assert {d['category_id'] for d in result.detections} == {2, 7, 11}
  reference = _pycocotools(dataset, results)
  ours = [result.metrics[k] for k in coco.METRIC_NAMES]
  np.testing.assert_allclose(ours, reference.stats, atol=1e-6)
  assert set(result.per_class) == {'RBC', 'WBC', 'Platelets'}


def test_non_contiguous_ids_as_class_ids_and_unknown_classes():
  """Our coco_json source keeps the json ids as class ids (identity map);
  detections of a class the json does not have are ignored."""
  dataset = _remapped_bccd()
  results = _jittered(dataset, seed=4)
  extra = [dict(r, category_id=5) for r in results[:200]]  # no category 5
  result = _evaluate(dataset, results + extra)
  reference = _pycocotools(dataset, results)
  ours = [result.metrics[k] for k in coco.METRIC_NAMES]
  np.testing.assert_allclose(ours, reference.stats, atol=1e-6)


@pytest.mark.slow
def test_ground_truth_built_from_batches_equals_the_json():
  """No json: ground truth from (image ids, sizes, yxyx boxes, classes,
  crowd flags) scores like the json itself (bccd's area is w * h, which is
  what the built ground truth recomputes)."""
  dataset = _annotations('bccd')
  results = _jittered(dataset, seed=5)
  ids, boxes, scores, classes = _as_batch(dataset, results)
  labels = {c['id']: c['name'] for c in dataset['categories']}
  evaluator = coco.COCOEvaluator(None, label_map=labels)
  gt_ids, gt_boxes, _, gt_classes = _as_batch(
    dataset,
    [dict(a, score=1.0) for a in dataset['annotations']],
  )
  sizes = np.array([[im['height'], im['width']] for im in dataset['images']])
  evaluator.add_ground_truth(
    gt_ids, sizes, gt_boxes, gt_classes, np.zeros_like(gt_classes)
  )
  evaluator.add_detections(ids, boxes, scores, classes)
  result = evaluator.evaluate()
  reference = _pycocotools(dataset, results)
  ours = [result.metrics[k] for k in coco.METRIC_NAMES]
  np.testing.assert_allclose(ours, reference.stats, atol=1e-9)


def test_only_evaluated_images_count():
  """Images never added are not scored (eval.num_images), but an added
  image without detections is (its boxes are misses)."""
  dataset = _annotations('bccd')
  results = [
    dict(a, score=1.0) for a in dataset['annotations'] if a['image_id'] <= 10
  ]
  evaluator = coco.COCOEvaluator(copy.deepcopy(dataset))
  ids, boxes, scores, classes = _as_batch(dataset, results)
  evaluator.add_detections(ids[:10], boxes[:10], scores[:10], classes[:10])
  assert evaluator.evaluate().metrics['AP'] == pytest.approx(1.0)
  evaluator.reset()
  evaluator.add_detections(ids[:20], boxes[:20], scores[:20], classes[:20])
  n_hit = sum(1 for a in dataset['annotations'] if a['image_id'] <= 10)
  n_all = sum(1 for a in dataset['annotations'] if a['image_id'] <= 20)
  recall = evaluator.evaluate().metrics['ARmax100']
  assert 0 < recall < 1 and n_hit < n_all


def test_test_split_writes_a_submission():
  dataset = _annotations('bccd')
  images_only = {
    'images': dataset['images'],
    'categories': dataset['categories'],
  }
  results = _jittered(dataset, seed=6)[:50]
  result = _evaluate(images_only, results)
  assert result.testdev
  assert all(v == -1.0 for v in result.metrics.values())
  first = result.detections[0]
  assert first['bbox'] == [round(v, 2) for v in results[0]['bbox']]
  assert first['score'] == round(results[0]['score'], 3)


def test_metric_of_minus_one_is_explained(caplog):
  """No small boxes and no WBC in the ground truth: APs, ARs and WBC's AP
  are -1, and the log says why."""
  dataset = copy.deepcopy(_annotations('bccd'))
  dataset['annotations'] = [
    a
    for a in dataset['annotations']
    if a['area'] >= 32**2 and a['category_id'] != 2
  ]
  results = _jittered(dataset, seed=7)
  with caplog.at_level('INFO'):
    result = _evaluate(dataset, results)
  assert result.metrics['APs'] == result.metrics['ARs'] == -1.0
  assert result.metrics['AP'] > 0
  assert result.per_class['WBC'] == -1.0
  # One line: which metrics are -1 and for want of which ground truth.
  assert '-1 = no such ground truth' in caplog.text
  assert 'APs, ARs (small (area < 32^2) boxes)' in caplog.text
  assert 'per-class AP of 1 classes (WBC)' in caplog.text
