"""The synthetic "shapes" dataset, rendered inside tf.data.

Each image is a textured background (a colour gradient, faint stripes,
pixel noise) with 1..max_objects saturated shapes: class 1 rectangle,
2 ellipse, 3 triangle, 4 cross (num_classes picks the first kinds). Shapes
sit in distinct cells of a grid, so they never overlap and every box is
fully visible: easy enough for a small detector to learn in minutes on a
CPU, which is what the demo needs. Example `i` is a pure function of
(seed, split, i), so the dataset is deterministic and needs no files.
"""

from __future__ import annotations

import math

import tensorflow as tf

MAX_KINDS = 4
_SPLIT_SALT = {'train': 0, 'eval': 1}


def _uniform(seed, shape=(), lo=0.0, hi=1.0):
  return tf.random.stateless_uniform(shape, seed, lo, hi)


def _background(seed, h, w):
  seeds = tf.random.split(seed, 5)
  c0 = _uniform(seeds[0], [3], 40.0, 215.0)
  c1 = _uniform(seeds[1], [3], 40.0, 215.0)
  angle = _uniform(seeds[2], [], 0.0, 2 * math.pi)
  y = tf.range(h, dtype=tf.float32)[:, None] / h
  x = tf.range(w, dtype=tf.float32)[None, :] / w
  t = 0.5 + 0.5 * (tf.cos(angle) * (x - 0.5) + tf.sin(angle) * (y - 0.5))
  image = c0 + (c1 - c0) * t[..., None]
  freq = _uniform(seeds[3], [], 4.0, 24.0)  # stripes across the image
  along = x * tf.sin(angle) - y * tf.cos(angle)
  image += 12.0 * tf.sin(2 * math.pi * freq * along)[..., None]
  return image + 6.0 * tf.random.stateless_normal([h, w, 3], seeds[4])


def _colour(seed):
  """A saturated colour: one channel high, one low, one anywhere."""
  seeds = tf.random.split(seed, 2)
  mid = _uniform(seeds[0], [], 0.0, 255.0)
  values = tf.stack([235.0, 20.0, mid])
  return tf.gather(
    values, tf.random.experimental.stateless_shuffle(tf.range(3), seeds[1])
  )


def _mask(kind, box, h, w):
  """[h, w] bool: pixel centres inside the shape of `kind` in `box`."""
  y0, x0, y1, x1 = tf.unstack(box)
  y = tf.range(h, dtype=tf.float32)[:, None] + 0.5
  x = tf.range(w, dtype=tf.float32)[None, :] + 0.5
  cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
  ry, rx = (y1 - y0) / 2, (x1 - x0) / 2
  inside = (y >= y0) & (y <= y1) & (x >= x0) & (x <= x1)
  ellipse = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
  triangle = inside & (tf.abs(x - cx) <= rx * (y - y0) / (y1 - y0))
  cross = inside & ((tf.abs(x - cx) <= rx / 3.0) | (tf.abs(y - cy) <= ry / 3.0))
  return tf.switch_case(
    kind - 1,
    [lambda: inside, lambda: ellipse, lambda: triangle, lambda: cross],
  )


def generate(
  index: tf.Tensor,
  *,
  seed: int,
  split: str,
  image_size: tuple[int, int],
  num_classes: int,
  max_objects: int,
) -> dict[str, tf.Tensor]:
  """Example `index` as a decoded example (see sources.py)."""
  if not 1 <= num_classes <= MAX_KINDS:
    raise ValueError(f'synthetic num_classes must be 1..{MAX_KINDS}')
  h, w = image_size
  grid = math.ceil(math.sqrt(max_objects))
  cell_h, cell_w = h / grid, w / grid
  key = tf.random.experimental.stateless_fold_in(
    tf.constant([seed, _SPLIT_SALT[split]], tf.int64), tf.cast(index, tf.int64)
  )
  seeds = tf.random.split(key, 4 + max_objects)
  image = _background(seeds[0], h, w)
  count = tf.random.stateless_uniform(
    [], seeds[1], 1, max_objects + 1, tf.int32
  )
  cells = tf.random.experimental.stateless_shuffle(
    tf.range(grid * grid), seeds[2]
  )[:max_objects]
  kinds = tf.random.stateless_uniform(
    [max_objects], seeds[3], 1, num_classes + 1, tf.int32
  )
  boxes, areas = [], []
  for i in range(max_objects):
    s = tf.random.split(seeds[4 + i], 3)
    size = _uniform(s[0], [2], 0.35, 0.95) * [cell_h, cell_w]
    corner = _uniform(s[1], [2]) * ([cell_h, cell_w] - size)
    cell = tf.cast(tf.stack([cells[i] // grid, cells[i] % grid]), tf.float32)
    top_left = cell * [cell_h, cell_w] + corner
    box = tf.concat([top_left, top_left + size], 0)
    mask = _mask(kinds[i], box, h, w) & (i < count)
    image = tf.where(mask[..., None], _colour(s[2]), image)
    boxes.append(box)
    areas.append(tf.reduce_sum(tf.cast(mask, tf.float32)))
  boxes = tf.stack(boxes)[:count] / [h, w, h, w]
  image_id = tf.cast(index, tf.int32) + 1
  return {
    'image': tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8),
    'name': tf.strings.join([f'shapes-{split}-', tf.as_string(image_id)]),
    'image_id': image_id,
    'height': tf.constant(h, tf.int32),
    'width': tf.constant(w, tf.int32),
    'boxes': tf.cast(boxes, tf.float32),
    'classes': kinds[:count],
    'is_crowd': tf.zeros([count], tf.bool),
    'area': tf.stack(areas)[:count],
    'ok': tf.constant(True),
  }
