"""Sources against independent references: the official converter's
records, pycocotools reading the json, the VOC XML, and TFDS wiring."""

import glob
import json
import os
import pathlib
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tensorflow as tf
from conftest import shared_dir, shared_path
from pycocotools.coco import COCO

from effdet_jax.data import create_tfrecord, pipeline, sources, testing

SHARED = shared_dir()
ORACLE = SHARED / 'oracle' / 'official-tfrecord-coco16'
COCO128 = SHARED / 'data' / 'coco128'
BCCD = SHARED / 'data' / 'bccd'


@pytest.fixture(scope='module', autouse=True)
def _shared_data():
  # Every test here reads these; the conftest rule skips or fails them.
  shared_path('oracle', 'official-tfrecord-coco16')
  shared_path('data', 'coco128')
  shared_path('data', 'bccd')


def _by_id(ds):
  return {int(ex['image_id']): ex for ex in ds.as_numpy_iterator()}


def _eval_raw(**data):
  config = testing.small_config(**data)
  return _by_id(sources.raw_examples(config, 'eval'))


def test_reader_on_official_records_matches_json():
  ours = _eval_raw(
    source='tfrecord', eval_pattern=str(ORACLE / 'coco16-*.tfrecord')
  )
  coco = COCO(str(ORACLE / 'annotations.json'))
  assert sorted(ours) == sorted(coco.getImgIds())
  for image_id, ex in ours.items():
    info = coco.loadImgs(image_id)[0]
    raw = (COCO128 / 'images' / info['file_name']).read_bytes()
    assert ex['encoded'] == raw  # the same image
    assert (ex['height'], ex['width']) == (info['height'], info['width'])
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
    h, w = info['height'], info['width']
    want = [
      [y / h, x / w, (y + bh) / h, (x + bw) / w]
      for x, y, bw, bh in (a['bbox'] for a in anns)
    ]
    np.testing.assert_allclose(
      ex['boxes'], np.reshape(want, (-1, 4)), atol=1e-6
    )
    assert ex['classes'].tolist() == [a['category_id'] for a in anns]
    assert ex['is_crowd'].tolist() == [bool(a['iscrowd']) for a in anns]


def _features(path_pattern):
  out = {}
  for path in tf.io.gfile.glob(path_pattern):
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      ex = tf.train.Example.FromString(record)
      feats = {}
      for key, f in ex.features.feature.items():
        kind = f.WhichOneof('kind')
        feats[key] = list(getattr(f, kind).value)
      out[feats['image/source_id'][0]] = feats
  return out


def test_writer_matches_official_records(tmp_path):
  prefix = str(tmp_path / 'coco16')
  create_tfrecord.convert(
    'coco',
    str(ORACLE / 'annotations.json'),
    str(COCO128 / 'images'),
    prefix,
    num_shards=2,
  )
  ours = _features(prefix + '-*.tfrecord')
  official = _features(str(ORACLE / 'coco16-*.tfrecord'))
  assert ours.keys() == official.keys()
  for key, feats in official.items():
    theirs = {k: v for k, v in feats.items() if k != 'image/encoded'}
    mine = {k: v for k, v in ours[key].items() if k != 'image/encoded'}
    assert mine == theirs, key
  # Same round-robin sharding: shard i holds the same ids.
  for i in range(2):
    a = _features(f'{prefix}-{i:05d}-of-00002.tfrecord')
    b = _features(str(ORACLE / f'coco16-{i:05d}-of-00002.tfrecord'))
    assert a.keys() == b.keys()
  labels = json.loads((tmp_path / 'label_map.coco16.json').read_text())
  assert labels['1'] == 'person' and labels['90'] == 'toothbrush'


@pytest.fixture(scope='module')
def coco24(tmp_path_factory):
  """24 coco128 images (greyscale id 86, crowds, both empty images) as a
  json and as records written by our tool."""
  root = tmp_path_factory.mktemp('coco24')
  full = json.loads((COCO128 / 'annotations.json').read_text())
  keep = {im['id'] for im in full['images'][:22]} | {250, 508, 86}
  sub = dict(full)
  sub['images'] = [im for im in full['images'] if im['id'] in keep]
  sub['annotations'] = [a for a in full['annotations'] if a['image_id'] in keep]
  path = root / 'annotations.json'
  path.write_text(json.dumps(sub))
  create_tfrecord.convert(
    'coco', str(path), str(COCO128 / 'images'), str(root / 'c'), num_shards=1
  )
  return root, sub


def _plain(source_kwargs, size, n):
  config = testing.small_config(
    image_size=size,
    batch_size=n,
    input_rand_hflip=False,
    jitter_min=1.0,
    jitter_max=1.0,
    shuffle_buffer_size=0,
    **source_kwargs,
  )
  batch = next(iter(pipeline.train_dataset(config).as_numpy_iterator()))
  return config, batch


def test_round_trip_boxes_follow_resize_and_clip(coco24):
  root, sub = coco24
  size, n = (96, 128), len(sub['images'])
  _, batch = _plain(
    dict(source='tfrecord', train_pattern=str(root / 'c-*.tfrecord')), size, n
  )
  coco = COCO(str(root / 'annotations.json'))
  assert sorted(batch['image_id']) == sorted(coco.getImgIds())
  for b, image_id in enumerate(batch['image_id']):
    info = coco.loadImgs(int(image_id))[0]
    h, w = info['height'], info['width']
    # Official, jitter factor 1: scale = min(int(T_h)/h, int(T_w)/w); boxes
    # scale by the integer scaled size, clip to [0, size - 1]
    # (`efficientdet/dataloader.py`,
    # `InputProcessor.set_training_random_scale_factors`,
    # `DetectionInputProcessor.resize_and_crop_boxes`).
    scale = min(size[0] / h, size[1] / w)
    sh, sw = int(h * scale), int(w * scale)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=int(image_id), iscrowd=False))
    want = []
    for a in anns:
      x, y, bw, bh = a['bbox']
      box = np.array(
        [y / h * sh, x / w * sw, (y + bh) / h * sh, (x + bw) / w * sw]
      )
      box = np.clip(box, 0, [size[0] - 1, size[1] - 1] * 2)
      if (box[2] - box[0]) * (box[3] - box[1]) > 0:
        want.append((a['category_id'], box))
    got = batch['classes'][b]
    assert (got > 0).sum() == len(want), image_id  # crowds dropped
    np.testing.assert_allclose(
      batch['boxes'][b][: len(want)],
      np.reshape([w_[1] for w_ in want], (-1, 4)),
      atol=0.5,
    )
    assert got[: len(want)].tolist() == [w_[0] for w_ in want]
    assert batch['image_scale'][b] == pytest.approx(1 / scale, rel=1e-6)
    assert batch['image_size'][b].tolist() == [h, w]


def test_coco_json_source_gives_the_same_batches(coco24):
  root, sub = coco24
  n = len(sub['images'])
  _, a = _plain(
    dict(source='tfrecord', train_pattern=str(root / 'c-*.tfrecord')),
    (64, 64),
    n,
  )
  _, b = _plain(
    dict(
      source='coco_json',
      train_json=str(root / 'annotations.json'),
      train_images=str(COCO128 / 'images'),
    ),
    (64, 64),
    n,
  )
  ia, ib = np.argsort(a['image_id']), np.argsort(b['image_id'])
  for key in a:
    if key == 'position':  # where each source's epoch order put it
      continue
    np.testing.assert_array_equal(a[key][ia], b[key][ib], err_msg=key)


def test_voc_tool_matches_xml(tmp_path):
  stems = ['BloodImage_00338', 'BloodImage_00000', 'BloodImage_00343']
  split = tmp_path / 'split.txt'
  split.write_text('\n'.join(stems) + '\n')
  label_map = tmp_path / 'map.json'
  label_map.write_text('{"RBC": 1, "WBC": 2, "Platelets": 3}')
  skipped = create_tfrecord.convert(
    'voc',
    str(BCCD / 'xml'),
    str(BCCD / 'images'),
    str(tmp_path / 'b'),
    num_shards=2,
    split=str(split),
    label_map=str(label_map),
  )
  assert skipped['zero_area_box'] == 2  # the two degenerate source boxes
  raw = _eval_raw(source='tfrecord', eval_pattern=str(tmp_path / 'b-*'))
  names = {'RBC': 1, 'WBC': 2, 'Platelets': 3}
  for image_id, stem in enumerate(stems, start=1):
    root = ET.parse(BCCD / 'xml' / f'{stem}.xml').getroot()
    want, classes = [], []
    for obj in root.iter('object'):
      b = [
        float(obj.find('bndbox/' + k).text)
        for k in ('ymin', 'xmin', 'ymax', 'xmax')
      ]
      if b[2] > b[0] and b[3] > b[1]:
        want.append(np.array(b) / [480, 640, 480, 640])
        classes.append(names[obj.find('name').text])
    np.testing.assert_allclose(
      raw[image_id]['boxes'], np.reshape(want, (-1, 4)), atol=1e-6
    )
    assert raw[image_id]['classes'].tolist() == classes
  coco = COCO(str(tmp_path / 'json_b.json'))  # the eval json beside
  assert len(coco.getAnnIds()) == sum(len(r['classes']) for r in raw.values())


def _voc_bccd(prefix, num_shards=2):
  """Three BCCD images written with the VOC tool (label map and eval json
  beside the records)."""
  root = pathlib.Path(prefix).parent
  split = root / 'split.txt'
  split.write_text('BloodImage_00338\nBloodImage_00000\n')
  label_map = root / 'map.json'
  label_map.write_text('{"RBC": 1, "WBC": 2, "Platelets": 3}')
  create_tfrecord.convert(
    'voc',
    str(BCCD / 'xml'),
    str(BCCD / 'images'),
    prefix,
    num_shards=num_shards,
    split=str(split),
    label_map=str(label_map),
  )


BCCD_NAMES = {1: 'RBC', 2: 'WBC', 3: 'Platelets'}


def test_official_val_glob_matches_only_records(tmp_path):
  """The official README reads `--validation_file_pattern=tfrecord/val*`:
  that glob must match the shards and nothing we write beside them (a
  json there fails the official reader: `corrupted record at 0`)."""
  out = tmp_path / 'tfrecord'
  out.mkdir()
  prefix = str(out / 'val')
  _voc_bccd(prefix)
  matched = sorted(tf.io.gfile.glob(prefix + '*'))
  assert matched == [f'{prefix}-{i:05d}-of-00002.tfrecord' for i in range(2)]
  assert sorted(glob.glob(prefix + '*')) == matched
  count = 0
  for path in matched:  # as the official reader: every record parses
    for record in tf.data.TFRecordDataset(path):
      tf.train.Example.FromString(record.numpy())
      count += 1
  assert count == 2
  # The side files exist, under names the glob does not match.
  assert (out / 'label_map.val.json').exists()
  assert (out / 'json_val.json').exists()
  # Our pipeline, given the official pattern, finds the label map and
  # reads the examples.
  config = testing.small_config(source='tfrecord', eval_pattern=prefix + '*')
  assert sources.dataset_label_map(config) == BCCD_NAMES
  assert len(_eval_raw(source='tfrecord', eval_pattern=prefix + '*')) == 2


def test_label_map_of_records_written_before_the_rename(tmp_path):
  """Records written with the old PREFIX_label_map.json still find it;
  the new name wins when both are present."""
  prefix = str(tmp_path / 'val')
  _voc_bccd(prefix, num_shards=1)
  new = tmp_path / 'label_map.val.json'
  old = tmp_path / 'val_label_map.json'
  new.rename(old)
  config = testing.small_config(
    source='tfrecord', eval_pattern=prefix + '-*.tfrecord'
  )
  assert sources.dataset_label_map(config) == BCCD_NAMES
  new.write_text('{"1": "a", "2": "b", "3": "c"}')
  assert sources.dataset_label_map(config) == {1: 'a', 2: 'b', 3: 'c'}


def test_output_name_a_side_file_would_match_is_refused(tmp_path):
  for base in ('label', 'json'):
    with pytest.raises(ValueError, match='would match the shard pattern'):
      _voc_bccd(str(tmp_path / base))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['map.json', 'split.txt']


def test_tfds_coco_wiring(monkeypatch):
  import tensorflow_datasets as tfds

  files = ['000000000009.jpg', '000000000025.jpg']
  coco = COCO(str(COCO128 / 'annotations.json'))

  def as_dataset(self, *args, **kwargs):
    del args, kwargs
    rows = []
    for name in files:
      image_id = int(name[:-4])
      info = coco.loadImgs(image_id)[0]
      anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
      h, w = info['height'], info['width']
      cats = sorted(coco.getCatIds())
      rows.append(
        {
          'image': (COCO128 / 'images' / name).read_bytes(),
          'image/filename': name,
          'image/id': image_id,
          'objects': {
            'bbox': np.array(
              [
                [y / h, x / w, (y + bh) / h, (x + bw) / w]
                for x, y, bw, bh in (a['bbox'] for a in anns)
              ],
              np.float32,
            ),
            'label': np.array([cats.index(a['category_id']) for a in anns]),
            'is_crowd': np.array([bool(a['iscrowd']) for a in anns]),
            'area': np.array([a['area'] for a in anns], np.float32),
          },
        }
      )
    return tf.data.Dataset.from_generator(
      lambda: iter(rows),
      output_signature={
        'image': tf.TensorSpec([], tf.string),
        'image/filename': tf.TensorSpec([], tf.string),
        'image/id': tf.TensorSpec([], tf.int64),
        'objects': {
          'bbox': tf.TensorSpec([None, 4], tf.float32),
          'label': tf.TensorSpec([None], tf.int64),
          'is_crowd': tf.TensorSpec([None], tf.bool),
          'area': tf.TensorSpec([None], tf.float32),
        },
      },
    )

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    got = _eval_raw(source='tfds', tfds_name='coco/2017')
  for name in files:
    image_id = int(name[:-4])
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    # TFDS's contiguous 0..79 labels come back as COCO ids 1..90.
    assert got[image_id]['classes'].tolist() == [a['category_id'] for a in anns]


def test_label_map_from_json_source():
  config = testing.small_config(
    source='coco_json', train_json=str(BCCD / 'annotations.json')
  )
  assert sources.label_map(config) == {1: 'RBC', 2: 'WBC', 3: 'Platelets'}


def test_json_paths_are_relative_to_image_dir():
  table = sources.read_coco_json(
    str(ORACLE / 'annotations.json'), str(COCO128 / 'images')
  )
  assert all(os.path.exists(p) for p in table['path'])
  assert table['row_splits'][-1] == len(table['classes']) == 112
