"""Box-aware image ops for detection AutoAugment.

Official ops: `efficientdet/aug/autoaugment.py: NAME_TO_FUNC` (`equalize`,
`rotate_with_bboxes`, `bbox_cutout`, `_apply_multi_bbox_augmentation`, ...).

Images are uint8 [h, w, 3]; boxes are normalised yxyx [N, 4]. Pixel ops
follow the PIL semantics the official ops reproduce (blend truncates to
uint8, Equalize builds PIL's lookup table, ...). Geometric ops use
`tf.raw_ops.ImageProjectiveTransformV3` (nearest neighbour, fill 128), and
move the boxes with the same matrix, so pixels and boxes cannot drift
apart: the boxes' corners are mapped and enclosed, clipped to [0, 1], and
a box squeezed to zero width or height gets the official 0.05 margin.
Random draws are stateless, from the `seed` each op receives.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tensorflow as tf

REPLACE = 128  # official fill value of geometric ops and cutouts
_MARGIN = 0.05  # official `_check_bbox_area` delta

ImageFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def _u8(x: tf.Tensor) -> tf.Tensor:
  """float -> uint8 as the official ops do it: clip, then truncate."""
  return tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8)


def blend(image1, image2, factor):
  """image1 + factor * (image2 - image1), clipped, truncated to uint8."""
  a, b = tf.cast(image1, tf.float32), tf.cast(image2, tf.float32)
  return _u8(a + factor * (b - a))


# -- pixel ops ---------------------------------------------------------------


def autocontrast(image):
  """Per channel, stretch [min, max] to [0, 255] (unchanged if flat)."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-6), 1.0)
  offset = tf.where(hi > lo, -lo * scale, 0.0)
  return _u8(x * scale + offset)


def _equalize_channel(channel):
  values = tf.reshape(tf.cast(channel, tf.int32), [-1])
  histo = tf.math.bincount(values, minlength=256, maxlength=256)
  last = tf.reduce_max(tf.where(histo > 0, tf.range(256), 0))
  step = (tf.reduce_sum(histo) - histo[last]) // 255
  safe = tf.maximum(step, 1)
  # PIL: lut[i] = (sum(histo[:i]) + step // 2) // step, clipped.
  lut = (tf.cumsum(histo, exclusive=True) + safe // 2) // safe
  lut = tf.clip_by_value(lut, 0, 255)
  values = tf.cast(channel, tf.int32)
  out = tf.where(step > 0, tf.gather(lut, values), values)
  return tf.cast(out, tf.uint8)


def equalize(image):
  """PIL Equalize, per channel."""
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)


def posterize(image, bits: int):
  """Keep the top `bits` bits. The official shift is 8 - bits; for bits = 0
  (v3 level 2) TF's CPU kernel clamps a uint8 shift to 7, so one bit
  survives (checked on TF 2.21); we do the same, explicitly."""
  shift = min(8 - bits, 7)
  return tf.bitwise.left_shift(
    tf.bitwise.right_shift(image, shift), tf.constant(shift, tf.uint8)
  )


def solarize(image, threshold: int):
  """Invert pixels >= threshold."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < threshold, x, 255 - x), tf.uint8)


def solarize_add(image, addition: int, threshold: int = 128):
  """Add to pixels < threshold, clipped."""
  x = tf.cast(image, tf.int32)
  added = tf.clip_by_value(x + addition, 0, 255)
  return tf.cast(tf.where(x < threshold, added, x), tf.uint8)


def color(image, factor):
  """PIL Color: blend with the greyscale image."""
  grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
  return blend(grey, image, factor)


def contrast(image, factor):
  """PIL Contrast: blend with the mean grey level (truncated to uint8)."""
  grey = tf.cast(tf.image.rgb_to_grayscale(image), tf.float32)
  mean = tf.cast(tf.cast(tf.reduce_mean(grey), tf.uint8), tf.float32)
  return blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image, factor):
  """PIL Brightness: blend with black."""
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """PIL Sharpness: blend with the PIL SMOOTH-filtered image (the border
  pixels keep their values)."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.pad(_u8(smooth), [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  inner = tf.pad(tf.ones([h - 2, w - 2, 1], tf.bool), [[1, 1], [1, 1], [0, 0]])
  return blend(tf.where(inner, smooth, image), image, factor)


def _fill_rect(image, y0, y1, x0, x1, value):
  """Sets rows [y0, y1) x cols [x0, x1) (clipped to the image) to value."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  rows = tf.range(h)[:, None]
  cols = tf.range(w)[None, :]
  inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  return tf.where(inside[..., None], tf.cast(value, image.dtype), image)


def cutout(image, seed, pad_size: int):
  """A (2 pad_size)^2 square of 128 centred uniformly in the image."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  seeds = tf.random.split(seed, 2)
  cy = tf.random.stateless_uniform([], seeds[0], 0, h, tf.int32)
  cx = tf.random.stateless_uniform([], seeds[1], 0, w, tf.int32)
  return _fill_rect(
    image, cy - pad_size, cy + pad_size, cx - pad_size, cx + pad_size, REPLACE
  )


# -- geometric ops -----------------------------------------------------------


def _project(image, forward, offset):
  """Warps `image` by the forward map u_out = forward @ u_in + offset on
  continuous (x, y) coordinates (pixel i covers [i, i + 1))."""
  inv = tf.linalg.inv(forward)
  # Index coordinates: idx = u - 0.5, so idx_in = inv @ idx_out + c.
  c = tf.linalg.matvec(inv, 0.5 - offset) - 0.5
  t = tf.stack(
    [inv[0, 0], inv[0, 1], c[0], inv[1, 0], inv[1, 1], c[1], 0.0, 0.0]
  )
  out = tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=t[None],
    output_shape=tf.shape(image)[:2],
    fill_value=float(REPLACE),
    interpolation='NEAREST',
    fill_mode='CONSTANT',
  )[0]
  return tf.ensure_shape(out, image.shape)


def _move_boxes(boxes, forward, offset, h, w):
  """Encloses the mapped corners; clip to [0, 1]; official margin for
  boxes squeezed to zero size."""
  size = tf.cast(tf.stack([w, h]), tf.float32)
  y0, x0, y1, x1 = tf.unstack(boxes, axis=1)
  corners = tf.stack(
    [
      tf.stack([x0, y0], -1),
      tf.stack([x1, y0], -1),
      tf.stack([x0, y1], -1),
      tf.stack([x1, y1], -1),
    ],
    axis=1,
  )  # [N, 4, 2] normalised (x, y)
  moved = tf.einsum('ij,nkj->nki', forward, corners * size) + offset
  moved = tf.clip_by_value(moved / size, 0.0, 1.0)
  lo, hi = tf.reduce_min(moved, 1), tf.reduce_max(moved, 1)  # [N, 2] (x, y)
  flat = tf.equal(lo, hi)
  lo = tf.where(flat, tf.minimum(lo, 1.0 - _MARGIN), lo)
  hi = tf.where(flat, tf.maximum(hi, _MARGIN), hi)
  return tf.stack([lo[:, 1], lo[:, 0], hi[:, 1], hi[:, 0]], axis=1)


def _affine(image, boxes, forward, offset):
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  return _project(image, forward, offset), _move_boxes(
    boxes, forward, offset, h, w
  )


def _rotation(image, degrees):
  """Forward map of a rotation about the image centre, counter-clockwise
  as seen for positive degrees (the official tfa.image.rotate)."""
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  rad = tf.cast(degrees, tf.float32) * math.pi / 180.0
  cos, sin = tf.cos(rad), tf.sin(rad)
  forward = tf.stack([tf.stack([cos, sin]), tf.stack([-sin, cos])])
  centre = tf.stack([w / 2, h / 2])
  return forward, centre - tf.linalg.matvec(forward, centre)


def _shear(level, horizontal: bool):
  """Official shear (origin at the top-left): x_in = x + level y (X) or
  y_in = y + level x (Y); the forward map is its inverse."""
  level = tf.cast(level, tf.float32)
  one, zero = tf.constant(1.0), tf.constant(0.0)
  if horizontal:
    forward = tf.stack([tf.stack([one, -level]), tf.stack([zero, one])])
  else:
    forward = tf.stack([tf.stack([one, zero]), tf.stack([-level, one])])
  return forward, tf.zeros([2])


def _translation(pixels, horizontal: bool):
  """Content moves by -pixels (the official translate_x / _shift_bbox)."""
  p = -tf.cast(pixels, tf.float32)
  offset = tf.stack([p, 0.0]) if horizontal else tf.stack([0.0, p])
  return tf.eye(2), offset


def rotate_with_boxes(image, boxes, degrees):
  return _affine(image, boxes, *_rotation(image, degrees))


def shear_with_boxes(image, boxes, level, horizontal: bool):
  return _affine(image, boxes, *_shear(level, horizontal))


def translate_with_boxes(image, boxes, pixels, horizontal: bool):
  return _affine(image, boxes, *_translation(pixels, horizontal))


def rotate(image, degrees):
  return _project(image, *_rotation(image, degrees))


def shear(image, level, horizontal: bool):
  return _project(image, *_shear(level, horizontal))


def translate(image, pixels, horizontal: bool):
  return _project(image, *_translation(pixels, horizontal))


# -- box-driven ops ----------------------------------------------------------


def _box_pixels(box, h, w):
  """Official integer box corners: int(size * coord), max clipped."""
  hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  y0 = tf.cast(hf * box[0], tf.int32)
  x0 = tf.cast(wf * box[1], tf.int32)
  y1 = tf.minimum(tf.cast(hf * box[2], tf.int32), h - 1)
  x1 = tf.minimum(tf.cast(wf * box[3], tf.int32), w - 1)
  return y0, x0, y1, x1


def bbox_cutout(image, boxes, seed, pad_fraction: float):
  """Cutout inside one random box: a (2 pad) box-proportional rectangle of
  128 centred uniformly in the box."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  n = tf.shape(boxes)[0]

  def apply():
    seeds = tf.random.split(seed, 3)
    i = tf.random.stateless_uniform([], seeds[0], 0, n, tf.int32)
    y0, x0, y1, x1 = _box_pixels(boxes[i], h, w)
    pad_h = tf.cast(
      pad_fraction * tf.cast(y1 - y0 + 1, tf.float32) / 2, tf.int32
    )
    pad_w = tf.cast(
      pad_fraction * tf.cast(x1 - x0 + 1, tf.float32) / 2, tf.int32
    )
    cy = tf.random.stateless_uniform([], seeds[1], y0, y1 + 1, tf.int32)
    cx = tf.random.stateless_uniform([], seeds[2], x0, x1 + 1, tf.int32)
    return _fill_rect(
      image, cy - pad_h, cy + pad_h, cx - pad_w, cx + pad_w, REPLACE
    )

  return tf.cond(n > 0, apply, lambda: image), boxes


def only_bboxes(image, boxes, seed, prob: float, fn: ImageFn):
  """Applies fn(crop, seed) to each box's pixels with probability prob / 3
  (official), boxes unchanged, in a random order (overlaps differ)."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  n = tf.shape(boxes)[0]
  seeds = tf.random.split(seed, 2)
  order = tf.random.experimental.stateless_shuffle(tf.range(n), seeds[0])

  def body(i, image):
    s = tf.random.split(
      tf.random.experimental.stateless_fold_in(seeds[1], i), 2
    )
    y0, x0, y1, x1 = _box_pixels(boxes[order[i]], h, w)
    apply = (tf.random.stateless_uniform([], s[0]) < prob / 3.0) & (
      (y1 >= y0) & (x1 >= x0)
    )

    def augment():
      crop = image[y0 : y1 + 1, x0 : x1 + 1]
      return tf.raw_ops.TensorStridedSliceUpdate(
        input=image,
        begin=tf.stack([y0, x0, 0]),
        end=tf.stack([y1 + 1, x1 + 1, 3]),
        strides=tf.constant([1, 1, 1]),
        value=fn(crop, s[1]),
      )

    return i + 1, tf.cond(apply, augment, lambda: image)

  _, image = tf.while_loop(
    lambda i, _: i < n, body, [tf.constant(0), image], parallel_iterations=1
  )
  return image, boxes
