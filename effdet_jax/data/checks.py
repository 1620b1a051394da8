"""Loading and checking one example: bad input is counted, never fatal.

A long run must neither stop on one bad record nor skip it silently. Every
problem is counted in a `DataStats` (and logged, first few with the record
name); with `strict=True` it raises instead, naming the record. Images are
decoded here, inside one `tf.py_function` per example, because a failing
decode op inside a tf.data graph cannot be caught per record (measured: the
wrapper costs ~8% of a bare JPEG decode, less of the whole pipeline).
"""

from __future__ import annotations

import collections
import threading

import numpy as np
import tensorflow as tf
from absl import logging

# Reasons an image is skipped, and reasons one box is skipped.
IMAGE_PROBLEMS = ('missing_file', 'corrupt_image', 'image_size_mismatch')
BOX_PROBLEMS = (
  'zero_area_box',
  'box_outside_image',
  'non_finite_box',
  'bad_class_id',
  'too_many_boxes',
)
# Kept, but counted: negative examples.
NOTES = ('no_annotations',)

# Boxes may overshoot the image by float rounding of normalised coordinates.
OUTSIDE_TOLERANCE_PX = 0.01
_LOG_FIRST = 5


class NoUsableExamplesError(ValueError):
  """The input skips every image: training could never take a step."""


class DataStats:
  """Thread-safe counters of what the pipeline skipped or noticed."""

  def __init__(self, strict: bool = False, max_consecutive_skips: int = 0):
    self.strict = strict
    self.max_consecutive_skips = max_consecutive_skips
    self._lock = threading.Lock()
    self.counts: collections.Counter[str] = collections.Counter()
    self._consecutive = 0
    self.fatal: str | None = None  # why the input stopped (see `usable`)

  def usable(self, ok: bool) -> None:
    """Counts a run of unusable images; past `max_consecutive_skips` (> 0)
    raises NoUsableExamplesError, naming the skip reasons and counts."""
    with self._lock:
      self._consecutive = 0 if ok else self._consecutive + 1
      run = self._consecutive
    limit = self.max_consecutive_skips
    if limit > 0 and run >= limit:
      self.fatal = (
        f'the training input skipped {run} images in a row and yielded '
        f'none (skips so far: {self.summary()}); fix the data or the '
        'checks it fails (the warnings above name the first records), or '
        'raise data.max_consecutive_skips'
      )
      raise NoUsableExamplesError(self.fatal)

  def add(self, reason: str, name: str, detail: str = '', n: int = 1) -> None:
    """Counts `n` occurrences; raises ValueError naming the record if
    strict (negative examples are never an error)."""
    message = f'{reason} in record {name}' + (f': {detail}' if detail else '')
    if self.strict and reason not in NOTES:
      raise ValueError(f'data.strict=True: {message}')
    with self._lock:
      before = self.counts[reason]
      self.counts[reason] += n
    if before < _LOG_FIRST or (before + n) // 1000 > before // 1000:
      log = logging.info if reason in NOTES else logging.warning
      log('data: %s (%d so far)', message, before + n)

  def summary(self) -> str:
    """One line: every non-zero counter."""
    with self._lock:
      items = sorted(self.counts.items())
    return ', '.join(f'{k}={v}' for k, v in items) or 'no problems'


def _read(encoded: bytes, path: str) -> bytes:
  if encoded:
    return encoded
  with tf.io.gfile.GFile(path, 'rb') as f:
    return f.read()


def _check_image(stats, name, encoded, path, height, width):
  """The decoded uint8 [h, w, 3] image, or None (counted)."""
  try:
    data = _read(encoded, path)
  except (tf.errors.NotFoundError, OSError) as e:
    stats.add('missing_file', name, str(path or e))
    return None
  try:
    # channels=3: greyscale -> RGB, RGBA -> RGB (alpha dropped).
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    stats.add('corrupt_image', name, str(e).splitlines()[0][:200])
    return None
  h, w = int(image.shape[0]), int(image.shape[1])
  if height > 0 and width > 0 and (h, w) != (height, width):
    stats.add(
      'image_size_mismatch',
      name,
      f'annotation says {height}x{width} (HxW), image is {h}x{w}',
    )
    return None
  return image


def box_problems(
  boxes: np.ndarray, classes: np.ndarray, h: int, w: int, num_classes: int
) -> dict[str, np.ndarray]:
  """Masks [N] of boxes to skip, by reason (boxes normalised yxyx)."""
  px = boxes * np.array([h, w, h, w], np.float64)
  finite = np.all(np.isfinite(boxes), axis=1)
  tol = OUTSIDE_TOLERANCE_PX
  with np.errstate(invalid='ignore'):
    zero = (px[:, 2] <= px[:, 0]) | (px[:, 3] <= px[:, 1])
    outside = (
      (px[:, 0] < -tol)
      | (px[:, 1] < -tol)
      | (px[:, 2] > h + tol)
      | (px[:, 3] > w + tol)
    )
  return {
    'non_finite_box': ~finite,
    'zero_area_box': finite & zero,
    'box_outside_image': finite & ~zero & outside,
    'bad_class_id': (classes < 1) | (classes > num_classes),
  }


def load_and_check(
  example: dict[str, tf.Tensor],
  *,
  stats: DataStats,
  num_classes: int,
  drop_crowd: bool,
  max_instances: int,
) -> dict[str, tf.Tensor]:
  """Decodes `example['encoded']` (or reads `example['path']`), checks the
  annotations and keeps the good boxes. Adds 'image' and 'ok' (False: the
  image is unusable and must be filtered out)."""

  @tf.autograph.experimental.do_not_convert
  def check(encoded, path, name, height, width, boxes, classes, crowd):
    name = name.numpy().decode('utf8', 'replace')
    boxes, classes = boxes.numpy(), classes.numpy()
    n = len(classes)
    image = _check_image(
      stats,
      name,
      encoded.numpy(),
      path.numpy().decode('utf8'),
      int(height),
      int(width),
    )
    stats.usable(image is not None)
    if image is None:
      return tf.zeros([0, 0, 3], tf.uint8), np.zeros([n], bool), False
    keep = np.ones([n], bool)
    if n == 0:
      stats.add('no_annotations', name)
    h, w = int(image.shape[0]), int(image.shape[1])
    for reason, bad in box_problems(boxes, classes, h, w, num_classes).items():
      if bad.any():
        first = boxes[np.argmax(bad)].tolist(), int(classes[np.argmax(bad)])
        stats.add(reason, name, f'first (yxyx, class): {first}', int(bad.sum()))
        keep &= ~bad
    if drop_crowd:
      keep &= ~crowd.numpy()
    if keep.sum() > max_instances:
      extra = int(keep.sum()) - max_instances
      stats.add('too_many_boxes', name, f'{extra} over {max_instances}', extra)
      keep[np.flatnonzero(keep)[max_instances:]] = False
    return image, keep, True

  image, keep, ok = tf.py_function(
    check,
    [
      example['encoded'],
      example['path'],
      example['name'],
      example['height'],
      example['width'],
      example['boxes'],
      example['classes'],
      example['is_crowd'],
    ],
    [tf.uint8, tf.bool, tf.bool],
  )
  image.set_shape([None, None, 3])
  keep.set_shape([None])
  ok.set_shape([])
  out = {k: v for k, v in example.items() if k not in ('encoded', 'path')}
  for key in ('boxes', 'classes', 'is_crowd', 'area'):
    out[key] = tf.boolean_mask(example[key], keep)
  out['image'] = image
  out['ok'] = ok
  return out
