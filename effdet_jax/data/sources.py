"""Where examples come from: TFRecords, TFDS, a COCO json, or synthetic.

Every source yields *raw examples*, the one format the rest of the
pipeline reads:

  encoded  string   the image file's bytes ('' -> read `path`)
  path     string   image file to read when `encoded` is ''
  name     string   how messages name the record
  image_id int32    COCO image id / source_id (-1 when unknown)
  height, width     int32, the annotated size (0 = unknown, not checked)
  boxes    [N, 4]   float32 yxyx normalised to the image, as in the
                    official records
  classes  [N]      int32, the dataset's own 1-based class ids
  is_crowd [N]      bool
  area     [N]      float32, as the annotation gives it

The synthetic source yields already decoded examples (`image` instead of
`encoded`/`path`). Each host reads its own part (`process_index` of
`process_count`): whole files where there are enough of them, else every
n-th example. Evaluation sources are read once, in order.

Training sources are a sequence of epochs whose order is a function of
(seed, epoch) alone (data/position.py), each example paired with its
`Position` (epoch, offset in this host's epoch). A resumed run starts the
stream at a saved position: the epochs before it are never read, and the
examples of its epoch before the offset are skipped while still undecoded
(TFRecords: serialized bytes; a COCO json: integer indices; synthetic:
indices), so the cost of resuming does not grow with the step.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from effdet_jax.data import label_maps, position, synthetic, tfrecord_format
from effdet_jax.data.as_written import as_written

SOURCES = ('tfrecord', 'tfds', 'coco_json', 'synthetic')


def _split_key(split: str) -> str:
  if split not in ('train', 'eval'):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  return split


def raw_examples(
  config: Any, split: str, process_index: int = 0, process_count: int = 1
) -> tf.data.Dataset:
  """This host's raw (or, for synthetic, decoded) examples of a split:
  'eval' once, in order; 'train' forever (the examples of
  `train_examples` without their positions)."""
  split = _split_key(split)
  if split == 'train':
    return train_examples(config, process_index, process_count).map(
      as_written(lambda _, ex: ex)
    )
  data = config.data
  shard = (process_index, process_count)
  if data.source == 'tfrecord':
    return _tfrecord_eval(data.eval_pattern, data, shard)
  if data.source == 'tfds':
    return _tfds(data.tfds_name, data.tfds_eval_split, data, shard)
  if data.source == 'coco_json':
    table = _coco_table(config, data.eval_json, data.eval_images)
    index, count = shard
    ds = tf.data.Dataset.range(len(table['image_id'])).shard(count, index)
    return ds.map(
      as_written(_gather(table)), num_parallel_calls=tf.data.AUTOTUNE
    )
  if data.source == 'synthetic':
    return _synthetic_ids(data, 'eval', shard).map(
      as_written(_synthetic_fn(data, 'eval')),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
  raise ValueError(f'unknown data.source {data.source!r}; valid: {SOURCES}')


def train_examples(
  config: Any,
  process_index: int = 0,
  process_count: int = 1,
  start: position.Position = position.START,
) -> tf.data.Dataset:
  """This host's training stream from `start`: (position [2] int64, raw
  example) pairs, epoch after epoch, forever.

  Each source gives an epoch's order as cheap items (serialized records,
  indices) and a `finish` map that makes raw examples of them; only the
  items at or after `start` are finished.
  """
  data = config.data
  shard = (process_index, process_count)
  if data.source == 'tfrecord':
    epoch, finish = _tfrecord_epochs(data.train_pattern, data, shard)
  elif data.source == 'tfds':
    epoch, finish = _tfds_epochs(data, shard)
  elif data.source == 'coco_json':
    table = _coco_table(config, data.train_json, data.train_images)
    index, count = shard
    ids = tf.data.Dataset.range(len(table['image_id'])).shard(count, index)
    size = len(range(index, len(table['image_id']), count))
    # The index list is small: each epoch is a full shuffle of it.
    epoch = lambda e: ids.shuffle(  # noqa: E731
      max(size, 1), seed=position.epoch_seed(data.seed, e, 0)
    )
    finish = _gather(table)
  elif data.source == 'synthetic':
    ids = _synthetic_ids(data, 'train', shard)
    epoch, finish = (lambda e: ids), _synthetic_fn(data, 'train')
  else:
    raise ValueError(f'unknown data.source {data.source!r}; valid: {SOURCES}')
  return position.epochs(epoch, start).map(
    as_written(lambda p, item: (p, finish(item))),
    num_parallel_calls=tf.data.AUTOTUNE,
  )


# -- TFRecords in the official layout ---------------------------------------


def list_files(pattern: str) -> list[str]:
  """Sorted files matching comma-separated glob patterns."""
  files = []
  for part in pattern.split(','):
    if part.strip():
      files.extend(tf.io.gfile.glob(part.strip()))
  if not files:
    raise ValueError(f'no files match {pattern!r}')
  return sorted(set(files))


def _host_files(pattern: str, shard) -> tuple[list[str], bool]:
  """This host's files, and whether they are its own (else every host
  reads all files and keeps every count-th record)."""
  index, count = shard
  files = list_files(pattern)
  if len(files) >= count:
    return files[index::count], True
  logging.warning(
    'data: %d files for %d hosts; every host reads all files and keeps '
    'every %d-th record (slower). Write more shards.',
    len(files),
    count,
    count,
  )
  return files, False


def _read_records(names, num_files, data, shard, by_file) -> tf.data.Dataset:
  """Serialized records of the file names in `names`, `cycle_length` files
  at a time; where hosts share files, every count-th record."""
  ds = names.interleave(
    as_written(lambda f: tf.data.TFRecordDataset(f).prefetch(1)),
    cycle_length=min(data.cycle_length, num_files),
    block_length=1,
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=data.deterministic,
  )
  return ds if by_file else ds.shard(shard[1], shard[0])


def _shuffle_records(ds, data, e) -> tf.data.Dataset:
  """The official record shuffle buffer, seeded by (seed, epoch e)."""
  if data.shuffle_buffer_size <= 0:
    return ds
  return ds.shuffle(
    data.shuffle_buffer_size, seed=position.epoch_seed(data.seed, e, 1)
  )


def _tfrecord_eval(pattern, data, shard) -> tf.data.Dataset:
  files, by_file = _host_files(pattern, shard)
  names = tf.data.Dataset.from_tensor_slices(files)
  ds = _read_records(names, len(files), data, shard, by_file)
  return ds.map(
    as_written(tfrecord_format.parse), num_parallel_calls=tf.data.AUTOTUNE
  )


def _tfrecord_epochs(pattern, data, shard):
  """Epoch e: this host's files in an order drawn from (seed, e), read
  `cycle_length` at a time, then the official shuffle(64) of records (its
  seed also from (seed, e)); items are serialized records (`parse` is the
  finish). The file order is the same on every host, which matters when
  hosts share files."""
  files, by_file = _host_files(pattern, shard)

  def epoch(e):
    names = tf.data.Dataset.from_tensor_slices(files).shuffle(
      len(files), seed=position.epoch_seed(data.seed, e, 0)
    )
    records = _read_records(names, len(files), data, shard, by_file)
    return _shuffle_records(records, data, e)

  return epoch, tfrecord_format.parse


# -- TFDS: coco/2017, voc/2007, voc/2012 ------------------------------------


def _tfds_load(name, split, training, data, shard) -> tf.data.Dataset:
  import tensorflow_datasets as tfds

  index, count = shard
  if count > 1:
    split = tfds.even_splits(split, n=count)[index]
  return tfds.load(
    name,
    split=split,
    data_dir=data.tfds_data_dir or None,
    shuffle_files=training,
    decoders={'image': tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(
      shuffle_seed=data.seed,
      # Every epoch reads the files in the same order (shuffled once by
      # the seed), so an epoch is a function of (seed, epoch) alone.
      shuffle_reshuffle_each_iteration=False,
      interleave_cycle_length=data.cycle_length,
    ),
  )


def _tfds_finish(name: str):
  if name.startswith('coco'):
    return _from_tfds_coco
  if name.startswith('voc'):
    return _from_tfds_voc
  raise ValueError(f'tfds source supports coco/* and voc/*, not {name!r}')


def _tfds(name, split, data, shard) -> tf.data.Dataset:
  """The eval split, read once."""
  finish = _tfds_finish(name)
  ds = _tfds_load(name, split, False, data, shard)
  return ds.map(as_written(finish), num_parallel_calls=tf.data.AUTOTUNE)


def _tfds_epochs(data, shard):
  """Epoch e: the split's examples (images still encoded) in the fixed
  file order, through a shuffle buffer seeded by (seed, e)."""
  finish = _tfds_finish(data.tfds_name)
  base = _tfds_load(data.tfds_name, data.tfds_train_split, True, data, shard)

  return (lambda e: _shuffle_records(base, data, e)), finish


def _from_tfds_coco(ex: dict) -> dict:
  objects = ex['objects']
  # TFDS numbers the 80 used COCO categories 0..79; batches carry the COCO
  # category ids 1..90 like the official records
  # (`efficientdet/dataset/create_coco_tfrecord.py: create_tf_example`).
  ids = tf.constant(label_maps.COCO_CONTIGUOUS_TO_ID, tf.int32)
  return {
    'encoded': ex['image'],
    'path': tf.constant(''),
    'name': ex['image/filename'],
    'image_id': tf.cast(ex['image/id'], tf.int32),
    'height': tf.constant(0, tf.int32),
    'width': tf.constant(0, tf.int32),
    'boxes': tf.cast(objects['bbox'], tf.float32),
    'classes': tf.gather(ids, tf.cast(objects['label'], tf.int32)),
    'is_crowd': tf.cast(objects['is_crowd'], tf.bool),
    'area': tf.cast(objects['area'], tf.float32),
  }


def _from_tfds_voc(ex: dict) -> dict:
  objects = ex['objects']
  boxes = tf.cast(objects['bbox'], tf.float32)
  # '2008_000123.jpg' -> 2008000123 (fits int32); VOC2007 '000005' -> 5.
  digits = tf.strings.regex_replace(ex['image/filename'], r'[^0-9]', '')
  return {
    'encoded': ex['image'],
    'path': tf.constant(''),
    'name': ex['image/filename'],
    'image_id': tf.strings.to_number(digits, tf.int32),
    'height': tf.constant(0, tf.int32),
    'width': tf.constant(0, tf.int32),
    'boxes': boxes,
    # VOC labels 0..19 in the official pascal label-map order -> 1..20.
    'classes': tf.cast(objects['label'], tf.int32) + 1,
    'is_crowd': tf.zeros_like(objects['label'], tf.bool),
    # Official pascal converter: area in normalised units.
    'area': (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
  }


# -- COCO json + image folder -------------------------------------------------


def read_coco_json(
  json_path: str,
  images_dir: str,
  category_to_class: dict[int, int] | None = None,
) -> dict[str, np.ndarray]:
  """Per-image arrays from a COCO detection json, boxes normalised the way
  the official converter does it ((x + w) / W, in float64, then float32).
  Nothing is filtered here; the checks in checks.py count bad boxes.
  `category_to_class` maps category ids to class ids (unknown -> 0, which
  the checks count as a bad class id); None keeps the ids."""
  with tf.io.gfile.GFile(json_path) as f:
    coco = json.load(f)
  by_image: dict[int, list] = {}
  for ann in coco.get('annotations', []):
    by_image.setdefault(ann['image_id'], []).append(ann)
  rows = {k: [] for k in ('boxes', 'classes', 'is_crowd', 'area')}
  splits = [0]
  for image in coco['images']:
    anns = by_image.get(image['id'], [])
    height, width = float(image['height']), float(image['width'])
    for ann in anns:
      x, y, w, h = (float(v) for v in ann['bbox'])
      rows['boxes'].append(
        [y / height, x / width, (y + h) / height, (x + w) / width]
      )
      category = int(ann['category_id'])
      if category_to_class is not None:
        category = category_to_class.get(category, 0)
      rows['classes'].append(category)
      rows['is_crowd'].append(bool(ann.get('iscrowd', 0)))
      rows['area'].append(float(ann.get('area', w * h)))
    splits.append(splits[-1] + len(anns))
  images = coco['images']
  return {
    'path': np.array(
      [os.path.join(images_dir, im['file_name']) for im in images], object
    ),
    'name': np.array([im['file_name'] for im in images], object),
    'image_id': np.array([im['id'] for im in images], np.int32),
    'height': np.array([im['height'] for im in images], np.int32),
    'width': np.array([im['width'] for im in images], np.int32),
    'row_splits': np.array(splits, np.int64),
    'boxes': np.array(rows['boxes'], np.float32).reshape(-1, 4),
    'classes': np.array(rows['classes'], np.int32),
    'is_crowd': np.array(rows['is_crowd'], bool),
    'area': np.array(rows['area'], np.float32),
  }


def _coco_table(config, json_path, images_dir) -> dict[str, tf.Tensor]:
  if not json_path:
    raise ValueError('data.source=coco_json needs data.{train,eval}_json')
  remap = None
  if config.data.category_ids == 'contiguous':
    remap = class_map(config).category_to_class
  table = read_coco_json(json_path, images_dir, remap)
  return {k: tf.constant(v) for k, v in table.items()}


def _gather(const: dict[str, tf.Tensor]):
  """Image index -> its raw example (the image still a path)."""

  def gather(i):
    lo, hi = const['row_splits'][i], const['row_splits'][i + 1]
    out = {k: const[k][i] for k in ('path', 'name', 'image_id')}
    out.update({k: const[k][i] for k in ('height', 'width')})
    out.update(
      {k: const[k][lo:hi] for k in ('boxes', 'classes', 'is_crowd', 'area')}
    )
    out['encoded'] = tf.constant('')
    return out

  return gather


# -- synthetic shapes --------------------------------------------------------


def _synthetic_ids(data, split, shard) -> tf.data.Dataset:
  index, count = shard
  size = (
    data.synthetic_train_size if split == 'train' else data.synthetic_eval_size
  )
  return tf.data.Dataset.range(size).shard(count, index)


def _synthetic_fn(data, split):
  return lambda i: synthetic.generate(
    i,
    seed=data.seed,
    split=split,
    image_size=tuple(data.synthetic_image_size),
    num_classes=data.synthetic_num_classes,
    max_objects=data.synthetic_max_objects,
  )


# -- class names -------------------------------------------------------------


CATEGORY_IDS = ('keep', 'contiguous')


def class_map(config: Any) -> label_maps.ClassMap:
  """The run's classes: class id -> name and -> dataset category id.

  'keep': class ids are the dataset's ids (`dataset_label_map`).
  'contiguous' (coco_json): the categories sorted by id become 1..K.
  """
  mode = config.data.category_ids
  if mode not in CATEGORY_IDS:
    raise ValueError(f'data.category_ids={mode!r}; valid: {CATEGORY_IDS}')
  names = dataset_label_map(config)
  if mode == 'keep':
    return label_maps.ClassMap.identity(names)
  if config.data.source != 'coco_json':
    raise ValueError(
      "data.category_ids='contiguous' needs data.source='coco_json' (records "
      f'carry their class ids); source is {config.data.source!r}'
    )
  ids = sorted(names)
  return label_maps.ClassMap(
    {i + 1: names[c] for i, c in enumerate(ids)},
    {i + 1: c for i, c in enumerate(ids)},
  )


def label_map(config: Any) -> dict[int, str]:
  """{class id: name} for the configured data (for drawing and per-class
  metrics), after the data.category_ids mapping; only the model's classes
  (ids 1..model.num_classes)."""
  return class_map(config).for_model(int(config.model.num_classes)).names


def dataset_label_map(config: Any) -> dict[int, str]:
  """{dataset category id: name}: data.label_map if set, else what the
  source implies."""
  data = config.data
  if data.label_map:
    return label_maps.load(data.label_map)
  if data.source == 'synthetic':
    return {
      k: v
      for k, v in label_maps.SHAPES.items()
      if k <= data.synthetic_num_classes
    }
  if data.source == 'tfds':
    return dict(
      label_maps.VOC if data.tfds_name.startswith('voc') else label_maps.COCO
    )
  if data.source == 'coco_json':
    with tf.io.gfile.GFile(data.train_json or data.eval_json) as f:
      return {c['id']: c['name'] for c in json.load(f)['categories']}
  if data.source == 'tfrecord':  # our create_tfrecord writes one beside
    pattern = data.train_pattern or data.eval_pattern
    first = list_files(pattern)[0]
    prefix = re.sub(r'-\d{5}-of-\d{5}\.tfrecord$', '', first)
    # The second name: records written before the rename keep theirs.
    for path in label_maps.records_files(prefix):
      if tf.io.gfile.exists(path):
        return label_maps.load(path)
  if config.model.num_classes == 90:
    return dict(label_maps.COCO)
  return {i: str(i) for i in range(1, config.model.num_classes + 1)}
