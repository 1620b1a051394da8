"""The official EfficientDet TFRecord layout, both ways.

Official: written by
`efficientdet/dataset/create_coco_tfrecord.py: create_tf_example` and
`efficientdet/dataset/create_pascal_tfrecord.py: dict_to_tf_example`, read
by `efficientdet/object_detection/tf_example_decoder.py: TfExampleDecoder`.

`create_coco_tfrecord.py` / `create_pascal_tfrecord.py` write one
`tf.train.Example` per image with these keys; boxes are normalised to the
image (x / W, y / H) and the class label is the dataset's own 1-based id.
An image without annotations has no object keys at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import tensorflow as tf

_OBJ = 'image/object/'


def _bytes(values: Sequence[bytes]) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _floats(values: Sequence[float]) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def _ints(values: Sequence[int]) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def make_example(
  *,
  encoded: bytes,
  image_format: str,
  filename: str,
  source_id: str,
  height: int,
  width: int,
  objects: dict[str, list] | None,
) -> tf.train.Example:
  """A record with the official keys.

  Args:
    encoded: the image file's bytes, written unchanged (not re-encoded).
    image_format: 'jpeg' or 'png' (official: always 'jpeg').
    filename, source_id, height, width: image fields.
    objects: None (no annotations: no object keys, as the official
      converter writes), or lists under 'xmin', 'xmax', 'ymin', 'ymax'
      (normalised), 'text' (bytes), 'label' (int), and any of 'is_crowd',
      'area' (COCO) or 'difficult', 'truncated', 'view' (VOC).
  """
  feature = {
    'image/height': _ints([height]),
    'image/width': _ints([width]),
    'image/filename': _bytes([filename.encode('utf8')]),
    'image/source_id': _bytes([source_id.encode('utf8')]),
    'image/key/sha256': _bytes(
      [hashlib.sha256(encoded).hexdigest().encode('utf8')]
    ),
    'image/encoded': _bytes([encoded]),
    'image/format': _bytes([image_format.encode('utf8')]),
  }
  if objects is not None:
    for key in ('xmin', 'xmax', 'ymin', 'ymax'):
      feature[_OBJ + 'bbox/' + key] = _floats(objects[key])
    feature[_OBJ + 'class/text'] = _bytes(objects['text'])
    feature[_OBJ + 'class/label'] = _ints(objects['label'])
    for key in ('is_crowd', 'difficult', 'truncated'):
      if key in objects:
        feature[_OBJ + key] = _ints(objects[key])
    if 'area' in objects:
      feature[_OBJ + 'area'] = _floats(objects['area'])
    if 'view' in objects:
      feature[_OBJ + 'view'] = _bytes(objects['view'])
  return tf.train.Example(features=tf.train.Features(feature=feature))


_SPEC = {
  'image/encoded': tf.io.FixedLenFeature((), tf.string),
  'image/filename': tf.io.FixedLenFeature((), tf.string, ''),
  'image/source_id': tf.io.FixedLenFeature((), tf.string, ''),
  'image/height': tf.io.FixedLenFeature((), tf.int64, 0),
  'image/width': tf.io.FixedLenFeature((), tf.int64, 0),
  _OBJ + 'bbox/xmin': tf.io.VarLenFeature(tf.float32),
  _OBJ + 'bbox/xmax': tf.io.VarLenFeature(tf.float32),
  _OBJ + 'bbox/ymin': tf.io.VarLenFeature(tf.float32),
  _OBJ + 'bbox/ymax': tf.io.VarLenFeature(tf.float32),
  _OBJ + 'class/label': tf.io.VarLenFeature(tf.int64),
  _OBJ + 'area': tf.io.VarLenFeature(tf.float32),
  _OBJ + 'is_crowd': tf.io.VarLenFeature(tf.int64),
}


def source_id_to_int(source_id: tf.Tensor) -> tf.Tensor:
  """int32 image id: the number in source_id; '' -> -1 (official); other
  strings (some custom converters write file names) -> a stable hash."""
  is_number = tf.strings.regex_full_match(source_id, r'-?[0-9]{1,9}')
  number = tf.strings.to_number(tf.where(is_number, source_id, '0'), tf.int32)
  hashed = tf.cast(
    tf.strings.to_hash_bucket_fast(source_id, 2**31 - 1), tf.int32
  )
  return tf.where(
    is_number, number, tf.where(tf.equal(source_id, ''), -1, hashed)
  )


def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """A serialized record -> a raw example (see sources.py).

  Missing optional fields take the official decoder's defaults: is_crowd
  False, area = the box area in normalised units.
  """
  f = tf.io.parse_single_example(serialized, _SPEC)
  dense = {k: tf.sparse.to_dense(v) for k, v in f.items() if k.startswith(_OBJ)}
  boxes = tf.stack(
    [dense[_OBJ + 'bbox/' + k] for k in ('ymin', 'xmin', 'ymax', 'xmax')],
    axis=1,
  )
  n = tf.shape(boxes)[0]
  area = dense[_OBJ + 'area']
  area = tf.cond(
    tf.equal(tf.size(area), n),
    lambda: area,
    lambda: (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
  )
  crowd = dense[_OBJ + 'is_crowd']
  crowd = tf.cond(
    tf.equal(tf.size(crowd), n),
    lambda: crowd > 0,
    lambda: tf.zeros([n], tf.bool),
  )
  source_id = f['image/source_id']
  return {
    'encoded': f['image/encoded'],
    'path': tf.constant(''),
    'name': tf.strings.join(
      [f['image/filename'], ' (source_id ', source_id, ')']
    ),
    'image_id': source_id_to_int(source_id),
    'height': tf.cast(f['image/height'], tf.int32),
    'width': tf.cast(f['image/width'], tf.int32),
    'boxes': boxes,
    'classes': tf.cast(dense[_OBJ + 'class/label'], tf.int32),
    'is_crowd': crowd,
    'area': area,
  }
