"""Preprocessing facts, pipeline mechanics, the synthetic dataset, and the
host -> global array helper.

Official preprocessing: `efficientdet/dataloader.py: InputReader.dataset_parser`
with `DetectionInputProcessor`.
"""

import jax
import numpy as np
import pytest
import tensorflow as tf
from conftest import shared_path
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from effdet_jax.data import pipeline, preprocess, testing


def _params(**kw):
  base = dict(
    image_size=(128, 128),
    mean_rgb=(123.675, 116.28, 103.53),
    stddev_rgb=(58.395, 57.12, 57.375),
  )
  return preprocess.Params(**{**base, **kw})


def _example(image, boxes, classes=None):
  n = len(boxes)
  return {
    'image': tf.constant(image, tf.uint8),
    'boxes': tf.constant(np.reshape(boxes, (-1, 4)), tf.float32),
    'classes': tf.constant(classes or [1] * n, tf.int32),
    'is_crowd': tf.zeros([n], tf.bool),
    'area': tf.ones([n], tf.float32),
    'image_id': tf.constant(7),
  }


def test_jitter_geometry_by_hand():
  # f = 1.5, T = 512, image 480 x 640: scaled = int(768); scale =
  # min(768 / 480, 768 / 640) = 1.2 -> 576 x 768; crop offsets within the
  # overflow (64, 256). Official: `efficientdet/dataloader.py`,
  # `InputProcessor.set_training_random_scale_factors`.
  for s in range(5):
    scale, sh, sw, oy, ox = preprocess.jitter_geometry(
      480, 640, (512, 512), None, 1.5, 1.5, tf.constant([s, 0], tf.int64)
    )
    assert float(scale) == pytest.approx(1.2)
    assert (int(sh), int(sw)) == (576, 768)
    assert 0 <= int(oy) < 64 and 0 <= int(ox) < 256


def test_eval_resize_pads_with_the_mean_colour():
  # Aspect-preserving fit, pad bottom/right; normalisation comes first, so
  # the padding is 0 = the mean colour (`efficientdet/dataloader.py`,
  # `InputProcessor.set_scale_factors_to_output_size` and
  # `resize_and_crop_image`).
  image = np.full((480, 640, 3), 200, np.uint8)
  out = preprocess.eval_preprocess(
    _example(image, [[0.5, 0.5, 1.0, 1.0]]), _params()
  )
  img = out['image'].numpy()
  np.testing.assert_array_equal(img[96:], 0.0)  # 480 * 0.2 = 96 rows of image
  want = (200 - np.array(_params().mean_rgb)) / np.array(_params().stddev_rgb)
  np.testing.assert_allclose(
    img[:96], np.broadcast_to(want, img[:96].shape), rtol=1e-5
  )
  assert float(out['image_scale']) == pytest.approx(5.0)
  # Boxes clip to [0, size - 1]: x = 1.0 * 128 -> 127
  # (`efficientdet/dataloader.py: DetectionInputProcessor.clip_boxes`).
  np.testing.assert_allclose(out['boxes'][0], [48, 64, 96, 127])
  assert out['image_size'].numpy().tolist() == [480, 640]


def test_resize_is_bilinear_without_antialiasing():
  # Half-pixel bilinear at exactly 1/2 samples between 2x2 pixels: the
  # block mean (an antialiasing filter would reach the neighbours).
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (256, 256, 3)).astype(np.uint8)
  p = _params()
  out = preprocess.eval_preprocess(_example(image, []), p)['image'].numpy()
  norm = (image - np.array(p.mean_rgb)) / np.array(p.stddev_rgb)
  blocks = norm.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
  np.testing.assert_allclose(out, blocks, atol=1e-4)


def test_vanished_boxes_are_dropped():
  # Cropped away -> zero area after the clip -> dropped with its class.
  boxes, keep = preprocess.transform_boxes(
    tf.constant([[0.0, 0.0, 0.1, 0.1], [0.5, 0.5, 0.9, 0.9]]),
    1000,
    1000,
    200,
    200,
    (512, 512),
  )
  assert keep.numpy().tolist() == [False, True]
  np.testing.assert_allclose(boxes[1], [300, 300, 511, 511])


def test_train_boxes_follow_flip_and_jitter():
  # A red rectangle on grey: whatever flip / scale / crop a seed draws,
  # the box still encloses the red pixels (flip before jitter, as in
  # `efficientdet/dataloader.py: InputReader.dataset_parser`).
  image = np.full((120, 160, 3), 90, np.uint8)
  image[30:90, 20:60] = [255, 0, 0]
  image[50:70, 70:90] = [0, 255, 0]  # unboxed marker right of the box
  box = [[30 / 120, 20 / 160, 90 / 120, 60 / 160]]
  p = _params(jitter_min=0.5, jitter_max=2.0)
  flips = set()
  for s in range(12):
    out = preprocess.train_preprocess(
      _example(image, box), tf.constant([s, 1], tf.int64), p
    )
    img = out['image'].numpy() * np.array(p.stddev_rgb) + np.array(p.mean_rgb)
    red = (img[..., 0] > 240) & (img[..., 1] < 15)
    if (out['classes'].numpy() > 0).sum() == 0:
      assert red.sum() == 0
      continue
    ys, xs = np.nonzero(red)
    got = out['boxes'].numpy()[0]
    np.testing.assert_allclose(
      got,
      [ys.min(), xs.min(), min(ys.max() + 1, 127), min(xs.max() + 1, 127)],
      atol=1.5,
    )
    green = (img[..., 1] > 240) & (img[..., 0] < 15)
    if green.any():  # flipped: the marker is left of the box
      flips.add(bool(np.nonzero(green)[1].mean() < xs.mean()))
  assert flips == {True, False}


def test_crowds_dropped_in_training_kept_in_eval():
  json_path = shared_path(
    'oracle', 'official-tfrecord-coco16', 'annotations.json'
  )
  images = shared_path('data', 'coco128', 'images')
  kw = dict(
    source='coco_json',
    train_json=str(json_path),
    train_images=str(images),
    eval_json=str(json_path),
    eval_images=str(images),
    batch_size=16,
  )
  config = testing.small_config(**kw)
  ev = [b for b in pipeline.eval_dataset(config).as_numpy_iterator()]
  assert sum(int(b['is_crowd'].sum()) for b in ev) > 0
  tr = next(pipeline.train_dataset(config).as_numpy_iterator())
  assert tr['is_crowd'].sum() == 0 and len(set(tr['image_id'])) == 16


def _synthetic(**kw):
  return testing.small_config(image_size=(64, 64), batch_size=4, **kw)


@pytest.mark.slow
def test_same_seed_same_batches():
  def first(seed):
    config = _synthetic(autoaugment_policy='v0', seed=seed)
    it = pipeline.train_dataset(config).as_numpy_iterator()
    return [next(it) for _ in range(2)]

  a, b, c = first(0), first(0), first(1)
  for x, y in zip(a, b, strict=True):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_hosts_read_disjoint_parts():
  config = _synthetic(synthetic_eval_size=10)
  ids = []
  for index in range(2):
    ds = pipeline.eval_dataset(config, process_index=index, process_count=2)
    batches = list(ds.as_numpy_iterator())
    assert batches[0]['image'].shape[0] == 2  # global 4 over 2 hosts
    ids.append({int(i) for b in batches for i in b['image_id'][b['valid']]})
  assert ids[0].isdisjoint(ids[1]) and ids[0] | ids[1] == set(range(1, 11))


def test_eval_padding():
  config = _synthetic(synthetic_eval_size=5)
  batches = list(pipeline.eval_dataset(config).as_numpy_iterator())
  assert [b['valid'].sum() for b in batches] == [4, 1]
  assert np.all(batches[1]['image_id'][~batches[1]['valid']] == -1)
  fixed = list(pipeline.eval_dataset(config, num_batches=3).as_numpy_iterator())
  assert [b['valid'].sum() for b in fixed] == [4, 1, 0]


def test_synthetic_shapes_are_deterministic_and_learnable():
  config = _synthetic(synthetic_eval_size=24, synthetic_image_size=(96, 96))
  ex = [e for _, e in pipeline.examples(config, 'eval').as_numpy_iterator()]
  again = [e for _, e in pipeline.examples(config, 'eval').as_numpy_iterator()]
  classes = set()
  for a, b in zip(ex, again, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    boxes = a['boxes'] * 96
    assert len(boxes) >= 1 and np.all((boxes >= 0) & (boxes <= 96))
    # The shape fills its box (triangle 1/2, ellipse pi/4, ...).
    fill = a['area'] / (
      (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    )
    assert np.all((fill > 0.4) & (fill <= 1.1))  # pixel-centre counts
    for i in range(len(boxes)):  # no two boxes overlap
      for j in range(i):
        assert min(boxes[i, 2], boxes[j, 2]) <= max(
          boxes[i, 0], boxes[j, 0]
        ) or (min(boxes[i, 3], boxes[j, 3]) <= max(boxes[i, 1], boxes[j, 1]))
    classes |= set(a['classes'].tolist())
  assert classes == {1, 2, 3}


def test_to_global_on_8_devices():
  devices = np.array(jax.devices()[:8])
  assert len(devices) == 8, 'tests/conftest.py sets 8 fake CPU devices'
  sharding = NamedSharding(Mesh(devices, ('data',)), P('data'))
  config = _synthetic()
  config.train.batch_size = 8
  host = next(pipeline.train_dataset(config).as_numpy_iterator())
  out = next(pipeline.global_batches([host], sharding))
  for key, value in host.items():
    assert out[key].shape == value.shape and out[key].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out[key]), value)
  shards = out['image'].addressable_shards
  assert len(shards) == 8 and all(s.data.shape[0] == 1 for s in shards)
  np.testing.assert_array_equal(shards[3].data[0], host['image'][3])
