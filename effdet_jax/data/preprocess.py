"""Per-example preprocessing, in the official order.

Official: `efficientdet/dataloader.py: InputReader.dataset_parser`, with
`DetectionInputProcessor` (`normalize_image`, `random_horizontal_flip`,
`set_training_random_scale_factors`, `set_scale_factors_to_output_size`,
`resize_and_crop_image`, `resize_and_crop_boxes`) and `pad_to_fixed_size`.

Training: [AutoAugment on uint8, normalised boxes] -> normalise
(x - mean) / std -> random horizontal flip -> scale jitter f ~ U[min, max)
with an aspect-preserving scale and a random crop offset -> bilinear
resize (half-pixel centres, no antialiasing) -> crop -> pad bottom/right
with 0 (= the mean colour, since normalisation came first) -> boxes to
pixels of the network input, clipped to [0, size - 1], zero-area boxes
dropped -> labels padded to max_instances_per_image.
Evaluation: normalise -> aspect-preserving resize to fit -> pad.

All randomness is stateless and comes from one per-example `seed`, so a
(seed, example position) pair always gives the same output, whatever the
parallelism.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

from effdet_jax.data import autoaugment

# Output keys of one preprocessed example (a batch adds the leading B).
KEYS = (
  'image',
  'boxes',
  'classes',
  'image_id',
  'image_scale',
  'image_size',
  'is_crowd',
  'area',
)


@dataclasses.dataclass(frozen=True)
class Params:
  """What preprocessing reads from the run config."""

  image_size: tuple[int, int]  # (H, W) of the network input
  mean_rgb: tuple[float, ...]
  stddev_rgb: tuple[float, ...]
  scale_range: bool = False
  max_instances: int = 100
  hflip: bool = True
  jitter_min: float = 0.1
  jitter_max: float = 2.0
  target_size: tuple[int, int] | None = None
  autoaugment_policy: str = ''

  @classmethod
  def from_config(cls, config: Any) -> Params:
    model, data = config.model, config.data
    size = model.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    target = data.target_size
    return cls(
      image_size=(int(size[0]), int(size[1])),
      mean_rgb=_triple(model.mean_rgb),
      stddev_rgb=_triple(model.stddev_rgb),
      scale_range=bool(model.scale_range),
      max_instances=int(data.max_instances_per_image),
      hflip=bool(data.input_rand_hflip),
      jitter_min=float(data.jitter_min),
      jitter_max=float(data.jitter_max),
      target_size=tuple(target) if target else None,
      autoaugment_policy=data.autoaugment_policy or '',
    )


def _triple(x) -> tuple[float, float, float]:
  if isinstance(x, (int, float)):
    return (float(x),) * 3
  return tuple(float(v) for v in x)


def normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
  """uint8 [h, w, 3] -> float32 (x - mean) / std, on the 0..255 scale."""
  image = tf.cast(image, tf.float32)
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def random_flip(image, boxes, seed):
  """Left-right flip with p = 0.5 (official: flip if U > 0.5); boxes are
  normalised, xmin' = 1 - xmax, xmax' = 1 - xmin."""
  flip = tf.random.stateless_uniform([], seed) > 0.5
  ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=1)
  flipped = tf.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=1)
  return (
    tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image),
    tf.cond(flip, lambda: flipped, lambda: boxes),
  )


def jitter_geometry(height, width, out_size, target_size, lo, hi, seed):
  """Official `set_training_random_scale_factors`, in its float32 math.

  Returns (scale, scaled_h, scaled_w, offset_y, offset_x): the image is
  resized to (scaled_h, scaled_w) and cropped at the offsets.
  """
  seeds = tf.random.split(seed, 3)
  target = target_size or out_size
  factor = tf.random.stateless_uniform([], seeds[0], lo, hi)
  scaled_y = tf.cast(factor * target[0], tf.int32)
  scaled_x = tf.cast(factor * target[1], tf.int32)
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  scale = tf.minimum(
    tf.cast(scaled_y, tf.float32) / h, tf.cast(scaled_x, tf.float32) / w
  )
  scaled_h = tf.cast(h * scale, tf.int32)
  scaled_w = tf.cast(w * scale, tf.int32)
  over_y = tf.cast(tf.maximum(0, scaled_h - out_size[0]), tf.float32)
  over_x = tf.cast(tf.maximum(0, scaled_w - out_size[1]), tf.float32)
  offset_y = tf.cast(
    over_y * tf.random.stateless_uniform([], seeds[1]), tf.int32
  )
  offset_x = tf.cast(
    over_x * tf.random.stateless_uniform([], seeds[2]), tf.int32
  )
  return scale, scaled_h, scaled_w, offset_y, offset_x


def fit_geometry(height, width, out_size):
  """Eval: the largest aspect-preserving scale that fits, no offset."""
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  scale = tf.minimum(out_size[0] / h, out_size[1] / w)
  zero = tf.constant(0, tf.int32)
  return (
    scale,
    tf.cast(h * scale, tf.int32),
    tf.cast(w * scale, tf.int32),
    zero,
    zero,
  )


def resize_crop_pad(image, scaled_h, scaled_w, offset_y, offset_x, out_size):
  """Bilinear resize (no antialiasing), crop at the offset, pad bottom and
  right with 0 to out_size."""
  image = tf.image.resize(
    image, tf.stack([scaled_h, scaled_w]), method='bilinear', antialias=False
  )
  image = image[
    offset_y : offset_y + out_size[0], offset_x : offset_x + out_size[1]
  ]
  image = tf.image.pad_to_bounding_box(image, 0, 0, out_size[0], out_size[1])
  return tf.ensure_shape(image, [out_size[0], out_size[1], 3])


def transform_boxes(boxes, scaled_h, scaled_w, offset_y, offset_x, out_size):
  """Normalised boxes -> pixels of the network input: scale by the scaled
  size, subtract the crop offset, clip to [0, out - 1] (official), and a
  mask of the boxes with non-zero area."""
  size = tf.cast(tf.stack([scaled_h, scaled_w, scaled_h, scaled_w]), tf.float32)
  offset = tf.cast(
    tf.stack([offset_y, offset_x, offset_y, offset_x]), tf.float32
  )
  boxes = boxes * size - offset
  upper = tf.constant([out_size[0] - 1, out_size[1] - 1] * 2, tf.float32)
  boxes = tf.clip_by_value(boxes, 0.0, upper)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return boxes, tf.not_equal(area, 0.0)


def pad_rows(x: tf.Tensor, length: int, value) -> tf.Tensor:
  """Pads (or cuts) the first dimension of x to `length` with `value`."""
  x = x[:length]
  pad = [[0, length - tf.shape(x)[0]]] + [[0, 0]] * (len(x.shape) - 1)
  return tf.pad(x, pad, constant_values=value)


def _finish(example, image, boxes, keep, scale, params: Params) -> dict:
  m = params.max_instances
  if params.scale_range:  # official: after normalisation, at the very end
    image = image * 2.0 / 255.0 - 1.0
  h, w = tf.shape(example['image'])[0], tf.shape(example['image'])[1]
  return {
    'image': image,
    'boxes': tf.ensure_shape(
      pad_rows(tf.boolean_mask(boxes, keep), m, -1.0), [m, 4]
    ),
    'classes': tf.ensure_shape(
      pad_rows(tf.boolean_mask(example['classes'], keep), m, -1), [m]
    ),
    'image_id': tf.cast(example['image_id'], tf.int32),
    'image_scale': 1.0 / scale,
    'image_size': tf.stack([h, w]),
    'is_crowd': tf.ensure_shape(
      pad_rows(
        tf.cast(tf.boolean_mask(example['is_crowd'], keep), tf.int32), m, 0
      ),
      [m],
    ),
    'area': tf.ensure_shape(
      pad_rows(
        tf.cast(tf.boolean_mask(example['area'], keep), tf.float32), m, -1.0
      ),
      [m],
    ),
  }


def train_preprocess(example: dict, seed: tf.Tensor, params: Params) -> dict:
  """One training example (decoded, checked; crowd boxes already dropped)
  -> network input and padded labels. `seed`: int32/int64 [2]."""
  seeds = tf.random.split(seed, 3)
  image, boxes = example['image'], example['boxes']
  if params.autoaugment_policy:  # on uint8, boxes normalised (official)
    image, boxes = autoaugment.distort(
      image, boxes, params.autoaugment_policy, seeds[0]
    )
  out_size = params.image_size
  image = normalize(image, params.mean_rgb, params.stddev_rgb)
  if params.hflip:
    image, boxes = random_flip(image, boxes, seeds[1])
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  scale, sh, sw, oy, ox = jitter_geometry(
    h,
    w,
    out_size,
    params.target_size,
    params.jitter_min,
    params.jitter_max,
    seeds[2],
  )
  image = resize_crop_pad(image, sh, sw, oy, ox, out_size)
  boxes, keep = transform_boxes(boxes, sh, sw, oy, ox, out_size)
  return _finish(example, image, boxes, keep, scale, params)


def eval_preprocess(example: dict, params: Params) -> dict:
  """One evaluation example -> network input, labels in its frame."""
  out_size = params.image_size
  image = normalize(example['image'], params.mean_rgb, params.stddev_rgb)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  scale, sh, sw, oy, ox = fit_geometry(h, w, out_size)
  image = resize_crop_pad(image, sh, sw, oy, ox, out_size)
  boxes, keep = transform_boxes(example['boxes'], sh, sw, oy, ox, out_size)
  return _finish(example, image, boxes, keep, scale, params)
