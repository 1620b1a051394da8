"""Custom COCO-json data: any category ids, start-up checks that stop a run
before any compile, the label map saved in the workdir and used by
evaluation and inference, and what inspect_data reports."""

import json

import numpy as np
import PIL.Image
import pytest

from effdet_jax.data import dataset_checks, label_maps, sources, testing
from effdet_jax.evaluation import coco

W, H = 64, 48
# Sparse, large category ids: 'contiguous' numbers them 1..2.
CATS = [dict(id=7, name='cat'), dict(id=12, name='dog')]


def _write(
  tmp_path, images=None, anns=None, cats=None, files=None, complete=True
):
  """A tiny COCO json + PNG files; returns (json path, image folder)."""
  folder = tmp_path / 'images'
  folder.mkdir(exist_ok=True)
  if images is None:
    images = [
      dict(id=1, file_name='a.png', width=W, height=H),
      dict(id=2, file_name='b.png', width=W, height=H),
    ]
  if anns is None:
    anns = [
      dict(id=1, image_id=1, category_id=7, bbox=[2, 3, 20, 10], iscrowd=0),
      dict(id=2, image_id=1, category_id=12, bbox=[30, 5, 34, 40], iscrowd=0),
      dict(id=3, image_id=2, category_id=7, bbox=[0, 0, 64, 48], iscrowd=0),
    ]
  for a in anns if complete else ():
    a.setdefault('iscrowd', 0)
    a.setdefault('area', a['bbox'][2] * a['bbox'][3])
  for im in images:
    if files is None or im['file_name'] in files:
      PIL.Image.new('RGB', (W, H), (90, 120, 30)).save(folder / im['file_name'])
  path = tmp_path / 'ann.json'
  coco_json = dict(images=images, annotations=anns, categories=cats or CATS)
  path.write_text(json.dumps(coco_json))
  return str(path), str(folder)


def _config(path, folder, num_classes=2, **data):
  data = dict(dict(category_ids='contiguous'), **data)
  config = testing.small_config(
    source='coco_json',
    train_json=path,
    eval_json=path,
    train_images=folder,
    eval_images=folder,
    **data,
  )
  config.model.num_classes = num_classes
  return config


def _fails(config, *needles, split='train'):
  with pytest.raises(dataset_checks.DatasetError) as err:
    dataset_checks.verify(config, None, (split,))
  for needle in needles:
    assert needle in str(err.value), str(err.value)
  return str(err.value)


def test_any_category_ids_contiguous(tmp_path):
  config = _config(*_write(tmp_path))
  class_map, reports = dataset_checks.verify(config, None, ('train', 'eval'))
  assert class_map.names == {1: 'cat', 2: 'dog'}
  assert class_map.category_ids == {1: 7, 2: 12}
  assert reports['train'].class_counts == {1: 2, 2: 1}
  assert reports['train'].num_images == 2
  # The source yields class ids 1..K; evaluation writes the json's ids.
  ex = next(sources.raw_examples(config, 'eval').as_numpy_iterator())
  assert ex['classes'].tolist() == [1, 2]
  ev = coco.COCOEvaluator(
    annotations=config.data.eval_json,
    label_map=class_map.names,
    class_to_category=class_map.category_ids,
  )
  box = [[3.0, 2.0, 13.0, 22.0]]  # yxyx of annotation 1, a 'cat'
  ev.add_detections(np.array([1]), np.array([box]), [[0.9]], [[1]])
  result = ev.evaluate()
  assert result.detections[0]['category_id'] == 7
  assert result.per_class['cat'] == pytest.approx(1.0)


def test_category_ids_not_covered_by_num_classes(tmp_path):
  path, folder = _write(tmp_path)
  _fails(
    _config(path, folder, num_classes=5, category_ids='keep'),
    'class ids 7, 12 are not covered by model.num_classes=5',
    "data.category_ids='contiguous'",
  )
  _fails(
    _config(path, folder, num_classes=1),
    'class ids 2 are not covered by model.num_classes=1',
    'Set model.num_classes = 2',
  )


def test_num_classes_hint_follows_category_ids(tmp_path):
  """Categories already 1..K: 'contiguous' gives the same class ids as
  'keep', so the hint must not suggest the setting the run already has."""
  cats = [dict(id=1, name='cat'), dict(id=2, name='dog')]
  anns = [dict(id=1, image_id=1, category_id=2, bbox=[2, 3, 5, 5])]
  path, folder = _write(tmp_path, anns=anns, cats=cats)
  msg = _fails(
    _config(path, folder, num_classes=1),  # category_ids='contiguous'
    'class ids 2 are not covered by model.num_classes=1',
    'Set model.num_classes = 2',
  )
  assert 'category_ids' not in msg
  _fails(
    _config(path, folder, num_classes=1, category_ids='keep'),
    'Set model.num_classes >= 2',
    "data.category_ids='contiguous'",
  )


def test_zero_category_id_is_not_a_class(tmp_path):
  cats = [dict(id=0, name='cat'), dict(id=1, name='dog')]
  anns = [dict(id=1, image_id=1, category_id=0, bbox=[2, 3, 5, 5])]
  path, folder = _write(tmp_path, anns=anns, cats=cats)
  _fails(
    _config(path, folder, category_ids='keep'),
    'class ids 0 are not covered',
    '0 is background',
  )
  dataset_checks.verify(_config(path, folder), None, ('train',))  # 1..2


def test_category_ids_not_in_label_map(tmp_path):
  path, folder = _write(tmp_path)
  names = tmp_path / 'names.json'
  names.write_text(json.dumps({'7': 'cat'}))  # misses 12
  _fails(
    _config(path, folder, label_map=str(names)),
    'category ids 12 (1 boxes) are not in the label map',
  )
  names.write_text(json.dumps({'7': 'dog', '12': 'cat'}))
  _fails(
    _config(path, folder, label_map=str(names)),
    "7: 'cat' in the json, 'dog' in the map",
  )
  anns = [dict(id=1, image_id=1, category_id=99, bbox=[2, 3, 5, 5])]
  path, folder = _write(tmp_path, anns=anns)
  _fails(_config(path, folder), 'category ids 99 that its "categories"')


def test_duplicate_image_ids(tmp_path):
  images = [
    dict(id=1, file_name='a.png', width=W, height=H),
    dict(id=1, file_name='b.png', width=W, height=H),
  ]
  path, folder = _write(tmp_path, images=images)
  _fails(_config(path, folder), 'duplicate image ids 1')


def test_boxes_outside_images(tmp_path):
  anns = [
    dict(id=1, image_id=1, category_id=7, bbox=[50, 3, 20, 10]),  # x+w 70
    dict(id=2, image_id=2, category_id=12, bbox=[0, -2, 5, 5]),
    dict(id=3, image_id=2, category_id=12, bbox=[0, 0, 64, 48]),  # edge: ok
  ]
  path, folder = _write(tmp_path, anns=anns)
  msg = _fails(_config(path, folder), '2 boxes lie outside their image')
  assert 'annotation 1 of image 1 bbox [50, 3, 20, 10] in 64x48' in msg


def test_eval_json_without_area(tmp_path):
  anns = [dict(id=5, image_id=1, category_id=7, bbox=[2, 3, 5, 5])]
  path, folder = _write(tmp_path, anns=anns, complete=False)
  dataset_checks.verify(_config(path, folder), None, ('train',))
  _fails(_config(path, folder), 'annotations 5 lack "area"', split='eval')


def test_zero_size_boxes_are_counted_not_fatal(tmp_path):
  anns = [
    dict(id=1, image_id=1, category_id=7, bbox=[5, 5, 0, 0]),  # as in BCCD
    dict(id=2, image_id=2, category_id=12, bbox=[0, 0, 10, 10]),
  ]
  config = _config(*_write(tmp_path, anns=anns))
  _, reports = dataset_checks.verify(config, None, ('train',))
  assert reports['train'].zero_area_boxes == 1


def test_images_without_files(tmp_path):
  path, folder = _write(tmp_path, files={'a.png'})
  _fails(_config(path, folder), '1 of 2 images have no file', 'b.png')
  _fails(_config(path, str(tmp_path / 'nowhere')), '2 of 2 images')


def test_label_map_round_trip_and_mismatch(tmp_path):
  config = _config(*_write(tmp_path))
  workdir = tmp_path / 'work'
  class_map = dataset_checks.prepare_training(config, str(workdir))
  saved = label_maps.load_workdir(str(workdir))
  assert saved == class_map
  assert label_maps.load(str(workdir / 'label_map.json')) == {
    1: 'cat',
    2: 'dog',
  }
  # train.num_examples_per_epoch <= 0 -> the training json's size.
  config.train.num_examples_per_epoch = 0
  dataset_checks.prepare_training(config, str(workdir))
  assert config.train.num_examples_per_epoch == 2
  # Same data with other ids: a run resuming this workdir must stop.
  keep = _config(*_write(tmp_path), num_classes=12, category_ids='keep')
  with pytest.raises(dataset_checks.DatasetError) as err:
    dataset_checks.verify(keep, str(workdir), ('train',))
  msg = str(err.value)
  assert 'differs from' in msg and 'label_map.json' in msg
  assert "class 1: 'cat' (category id 7) (workdir) vs absent (config)" in msg


def test_infer_uses_the_workdir_label_map(tmp_path):
  from effdet_jax.tools import infer

  label_maps.save_workdir(
    str(tmp_path), label_maps.ClassMap({1: 'cat'}, {1: 7})
  )
  assert infer._label_map(None, '', str(tmp_path)) == {1: 'cat'}
  assert infer._label_map(None, 'voc', str(tmp_path))[1] == 'aeroplane'


def test_run_stops_before_compile(tmp_path, monkeypatch):
  """train_and_evaluate and --mode=eval check first: the model is never
  built (Trainer and the evaluator's model would be)."""
  from effdet_jax import api
  from effdet_jax.evaluation import runner
  from effdet_jax.train import trainer

  def no_model(*args, **kwargs):
    raise AssertionError('the model was built before the data check')

  monkeypatch.setattr(api, 'build_model', no_model)
  path, folder = _write(tmp_path, files={'a.png'})
  with pytest.raises(dataset_checks.DatasetError, match='have no file'):
    trainer.train_and_evaluate(_config(path, folder), str(tmp_path / 'w1'))
  # A workdir trained with other classes: evaluation stops too.
  good = _config(*_write(tmp_path))
  workdir = tmp_path / 'w2'
  label_maps.save_workdir(
    str(workdir), label_maps.ClassMap({1: 'cat', 2: 'bird'}, {1: 7, 2: 12})
  )
  with pytest.raises(dataset_checks.DatasetError, match="'bird'"):
    runner.evaluate_checkpoint(good, str(workdir))
  with pytest.raises(dataset_checks.DatasetError, match="'bird'"):
    trainer.train_and_evaluate(good, str(workdir))


def test_inspect_counts_boxes_without_anchors(tmp_path):
  """Hand-made cases at 128x128 (D0 anchors: P3 base 32 px): a 4 px box has
  no anchor of IoU >= 0.5 but is force-matched to its best one; a second
  identical box loses that anchor to the first (lower index wins) and gets
  no positive anchor; a 40 px box has several."""
  from effdet_jax.tools import inspect_data

  images = [dict(id=1, file_name='a.png', width=128, height=128)]
  anns = [
    dict(id=1, image_id=1, category_id=7, bbox=[10, 10, 4, 4]),
    dict(id=2, image_id=1, category_id=7, bbox=[10, 10, 4, 4]),
    dict(id=3, image_id=1, category_id=12, bbox=[60, 60, 40, 40]),
  ]
  config = _config(*_write(tmp_path, images=images, anns=anns))
  boxes, classes, _ = inspect_data._pixel_boxes(
    inspect_data.read_split(config, 'train'), (128, 128), True
  )
  from effdet_jax.detection import anchors

  st = inspect_data.anchor_stats(
    boxes, classes, anchors.anchors_from_config(config.model), 0.5, 0.5
  )
  assert st['best_iou'][0] == pytest.approx(16 / 32**2, rel=1e-3)
  assert st['positives'].tolist()[:2] == [1, 0]
  assert st['positives'][2] > 1
  text = inspect_data.inspect(config, 'train')
  assert 'start-up checks: ok' in text
  row = next(r for r in text.splitlines() if r.strip().startswith('all'))
  assert row.split()[1:4] == ['3', '2', '1']
