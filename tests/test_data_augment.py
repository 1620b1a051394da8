"""AutoAugment ops: boxes stay on their pixels; pixel ops match PIL."""

import numpy as np
import PIL.Image
import pytest
import tensorflow as tf
from PIL import ImageEnhance, ImageOps

from effdet_jax.data import augment_ops, autoaugment

H, W = 240, 320
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
# Normalised yxyx; the third box touches the right edge.
BOXES = np.array(
  [[0.10, 0.10, 0.45, 0.40], [0.50, 0.30, 0.90, 0.60], [0.20, 0.70, 0.60, 1.0]],
  np.float32,
)


def _painted():
  rng = np.random.default_rng(0)
  image = rng.integers(60, 200, (H, W, 3)).astype(np.uint8)
  image[..., 0] = 100  # no background pixel is pure red, green or blue
  for colour, (y0, x0, y1, x1) in zip(COLOURS, BOXES, strict=True):
    image[round(y0 * H) : round(y1 * H), round(x0 * W) : round(x1 * W)] = colour
  return image


def _run(fn, image, boxes, seed, in_dataset):
  seed = tf.constant(seed, tf.int64)
  if not in_dataset:
    out = fn(tf.constant(image), tf.constant(boxes), seed)
    return out[0].numpy(), out[1].numpy()
  ds = tf.data.Dataset.from_tensors((image, boxes, seed)).map(fn)
  return next(ds.as_numpy_iterator())


def _colour_box(image, colour):
  ys, xs = np.nonzero(np.all(image == colour, axis=-1))
  if len(ys) < 20:
    return None  # (almost) moved out of the image
  return np.array(
    [ys.min() / H, xs.min() / W, (ys.max() + 1) / H, (xs.max() + 1) / W]
  )


def _iou(a, b):
  inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(
    0, min(a[3], b[3]) - max(a[1], b[1])
  )
  area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
  return inter / (area(a) + area(b) - inter)


GEOMETRIC = ['Rotate_BBox', 'ShearX_BBox', 'ShearY_BBox']
GEOMETRIC += ['TranslateX_BBox', 'TranslateY_BBox']


# Translations of level 10 (250 px) push every box out of this image.
@pytest.mark.parametrize(
  'name, level',
  [(n, lv) for n in GEOMETRIC for lv in (3, 5 if 'Translate' in n else 10)],
)
def test_geometric_ops_keep_boxes_on_their_pixels(name, level):
  fn = autoaugment.make_op(name, 1.0, level)
  image = _painted()
  checked = 0
  for seed in ([1, 2], [3, 4], [5, 6]):  # both signs of the argument
    out, boxes = _run(fn, image, BOXES, seed, in_dataset=seed == [1, 2])
    assert out.shape == image.shape and boxes.shape == BOXES.shape
    for colour, box in zip(COLOURS, boxes, strict=True):
      seen = _colour_box(out, colour)
      if seen is None:
        continue
      checked += 1
      assert _iou(seen, box) >= 0.9, (name, seed, seen, box)
      tol = 1.5 / np.array([H, W])
      assert np.all(box[:2] <= seen[:2] + tol) and np.all(
        box[2:] >= seen[2:] - tol
      )
  assert checked >= 3


PIXEL_OPS = [
  'AutoContrast',
  'Equalize',
  'Posterize',
  'Solarize',
  'SolarizeAdd',
  'Color',
  'Contrast',
  'Brightness',
  'Sharpness',
  'Cutout',
]


@pytest.mark.parametrize('name', PIXEL_OPS)
def test_pixel_ops_leave_boxes(name):
  out, boxes = _run(
    autoaugment.make_op(name, 1.0, 6), _painted(), BOXES, [7, 8], False
  )
  np.testing.assert_array_equal(boxes, BOXES)
  assert out.dtype == np.uint8 and out.shape == (H, W, 3)


def _inside_any_box(boxes):
  mask = np.zeros((H, W), bool)
  for y0, x0, y1, x1 in boxes:  # official integer corners, max inclusive
    mask[
      int(y0 * H) : min(int(y1 * H), H - 1) + 1,
      int(x0 * W) : min(int(x1 * W), W - 1) + 1,
    ] = True
  return mask


ONLY = ['Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Flip']
ONLY += ['Solarize', 'Equalize', 'Cutout']


@pytest.mark.parametrize('name', [n + '_Only_BBoxes' for n in ONLY])
def test_box_only_ops_change_pixels_only_inside_boxes(name):
  # prob 3 -> each box is augmented with probability 3 / 3 = 1.
  fn = autoaugment.make_op(name, 3.0, 8)
  image = _painted()
  out, boxes = _run(fn, image, BOXES, [9, 10], in_dataset=True)
  np.testing.assert_array_equal(boxes, BOXES)
  changed = np.any(out != image, axis=-1)
  assert changed.any(), name
  assert not (changed & ~_inside_any_box(BOXES)).any(), name


def test_bbox_cutout_is_centred_in_a_box():
  # Official: a (level / 10 * 0.75) box-sized hole centred inside one box
  # (it may reach past the box's edge).
  image = _painted()
  fn = autoaugment.make_op('BBox_Cutout', 1.0, 10)
  for seed in ([1, 1], [2, 2], [3, 3]):
    out, boxes = _run(fn, image, BOXES, seed, in_dataset=False)
    np.testing.assert_array_equal(boxes, BOXES)
    ys, xs = np.nonzero(np.any(out != image, axis=-1))
    assert np.all(out[ys, xs] == 128)
    cy, cx = (
      (ys.min() + ys.max() + 1) / 2 / H,
      (xs.min() + xs.max() + 1) / 2 / W,
    )
    inside = [y0 <= cy <= y1 and x0 <= cx <= x1 for y0, x0, y1, x1 in BOXES]
    assert any(inside)


def _photo():
  rng = np.random.default_rng(1)
  base = np.linspace(30, 220, W)[None, :, None] + rng.normal(0, 20, (H, W, 3))
  return np.clip(base, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
  'ours, pil, tol',
  [
    (augment_ops.equalize, ImageOps.equalize, 0),
    (augment_ops.autocontrast, ImageOps.autocontrast, 1),
    (
      lambda x: augment_ops.solarize(x, 150),
      lambda p: ImageOps.solarize(p, 150),
      0,
    ),
    (
      lambda x: augment_ops.posterize(x, 3),
      lambda p: ImageOps.posterize(p, 3),
      0,
    ),
    (
      lambda x: augment_ops.color(x, 1.6),
      lambda p: ImageEnhance.Color(p).enhance(1.6),
      2,
    ),
    (
      lambda x: augment_ops.contrast(x, 0.4),
      lambda p: ImageEnhance.Contrast(p).enhance(0.4),
      2,
    ),
    (
      lambda x: augment_ops.brightness(x, 1.3),
      lambda p: ImageEnhance.Brightness(p).enhance(1.3),
      1,
    ),
    (
      lambda x: augment_ops.sharpness(x, 1.9),
      lambda p: ImageEnhance.Sharpness(p).enhance(1.9),
      2,
    ),
  ],
)
def test_pixel_ops_match_pil(ours, pil, tol):
  image = _photo()
  got = ours(tf.constant(image)).numpy().astype(int)
  want = np.asarray(pil(PIL.Image.fromarray(image))).astype(int)
  inner = (slice(1, -1), slice(1, -1))  # PIL filters borders differently
  assert np.abs(got[inner] - want[inner]).max() <= tol


def test_posterize_zero_bits_is_tf_cpu_shift_clamp():
  # Official quirk (`efficientdet/aug/autoaugment.py: policy_v3`, Posterize
  # level 2 -> bits 0 in `posterize`): TF's CPU kernel clamps a uint8 shift
  # of 8 to 7, so the official op keeps the top bit.
  x = tf.constant(np.arange(256, dtype=np.uint8).reshape(16, 16, 1))
  x = tf.tile(x, [1, 1, 3])
  tf_shift = tf.bitwise.left_shift(
    tf.bitwise.right_shift(x, tf.constant(8, tf.uint8)),
    tf.constant(8, tf.uint8),
  )
  np.testing.assert_array_equal(augment_ops.posterize(x, 0), tf_shift)
  assert set(np.unique(augment_ops.posterize(x, 0))) == {0, 128}


def test_levels_follow_official_level_to_arg():
  # `efficientdet/aug/autoaugment.py: level_to_arg`: Rotate: level / 10 * 30
  # degrees; translate: level / 10 * 250 px.
  image = np.zeros((H, W, 3), np.uint8)
  box = np.array([[0.4, 0.4, 0.6, 0.6]], np.float32)
  _, moved = _run(
    autoaugment.make_op('TranslateX_BBox', 1.0, 2), image, box, [0, 0], False
  )
  assert abs(moved[0, 1] - box[0, 1]) * W == pytest.approx(50, abs=1e-3)


@pytest.mark.parametrize('policy', ['v0', 'v1', 'v2', 'v3', 'test', 'randaug'])
@pytest.mark.slow
def test_policies_run_in_tf_data_deterministically(policy):
  image, boxes = _painted(), BOXES

  def fn(i):
    seed = tf.stack([tf.constant(0, tf.int64), i])
    return autoaugment.distort(
      tf.constant(image), tf.constant(boxes), policy, seed
    )

  ds = tf.data.Dataset.range(6).map(fn, num_parallel_calls=2)
  first = list(ds.as_numpy_iterator())
  second = list(ds.as_numpy_iterator())
  for (a, ba), (b, bb) in zip(first, second, strict=True):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ba, bb)
    assert a.shape == image.shape and ba.shape == boxes.shape
    assert ba.min() >= 0.0 and ba.max() <= 1.0
    assert np.all(ba[:, 2:] > ba[:, :2])
  assert any(np.any(a != image) for a, _ in first)


def test_policy_tables_have_the_official_sizes():
  sizes = {k: len(v) for k, v in autoaugment.POLICIES.items()}
  assert sizes == {'v0': 5, 'v1': 20, 'v2': 15, 'v3': 15, 'test': 1}
  used = {
    op for p in autoaugment.POLICIES.values() for s in p for op, _, _ in s
  }
  assert used | set(autoaugment.RANDAUG_OPS) <= set(autoaugment.op_names())
