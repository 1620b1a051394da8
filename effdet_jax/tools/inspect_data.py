r"""What the configured anchors make of a dataset, before training on it.

  python -m effdet_jax.tools.inspect_data --config=configs/custom.py:bccd \
      [--split=train|eval] [--config.model.image_size=(384,384)] ...

Runs the start-up checks (dataset_checks.py; problems are printed, not
fatal here), then prints:
* boxes per class;
* a histogram of box sizes (sqrt of the area, pixels) at the configured
  image size after the eval resize (aspect kept, longer side fitted; the
  training jitter multiplies these by data.jitter_min..jitter_max), with
  the pyramid level of each box's best anchor;
* per class, the boxes with NO anchor of IoU >= train.matched_threshold,
  and the boxes with NO positive anchor at all after the official matcher
  (detection/targets.py `match`). The matcher force-matches each box's best
  anchor whatever its IoU (official `efficientdet/object_detection/
  argmax_matcher.py: ArgMaxMatcher`, force_match_for_each_row), so a box
  below the threshold still trains from one anchor -- a weak, single-anchor
  target, the usual cause of missed small objects -- and is lost completely
  only when another box (lower index wins) takes that same anchor. Fix
  small objects with a larger image size or a smaller model.anchor_scale,
  odd shapes with model.aspect_ratios.
Reads coco_json (the json, no image is decoded) and tfrecord sources (one
pass over the records, crowd boxes excluded like training does).
"""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

_BATCH = 8
SIZE_EDGES = (0, 8, 16, 32, 64, 128, 256, 512, math.inf)


def read_split(config: Any, split: str) -> list[dict[str, np.ndarray]]:
  """Per image: 'boxes' [n, 4] normalised yxyx, 'classes' (class ids),
  'is_crowd', 'height', 'width' (0 = unknown)."""
  from effdet_jax.data import sources, tfrecord_format  # noqa: PLC0415

  data = config.data
  training = split == 'train'
  if data.source == 'coco_json':
    remap = None
    if data.category_ids == 'contiguous':
      remap = sources.class_map(config).category_to_class
    path = data.train_json if training else data.eval_json
    images = data.train_images if training else data.eval_images
    t = sources.read_coco_json(path, images, remap)
    out = []
    for i in range(len(t['image_id'])):
      lo, hi = t['row_splits'][i], t['row_splits'][i + 1]
      out.append(
        dict(
          boxes=t['boxes'][lo:hi],
          classes=t['classes'][lo:hi],
          is_crowd=t['is_crowd'][lo:hi],
          height=int(t['height'][i]),
          width=int(t['width'][i]),
        )
      )
    return out
  if data.source == 'tfrecord':
    import tensorflow as tf  # noqa: PLC0415

    pattern = data.train_pattern if training else data.eval_pattern
    ds = tf.data.TFRecordDataset(sources.list_files(pattern))
    keys = ('boxes', 'classes', 'is_crowd', 'height', 'width')
    return [
      {k: ex[k] for k in keys}
      for ex in ds.map(tfrecord_format.parse).as_numpy_iterator()
    ]
  raise SystemExit(
    f'inspect_data reads coco_json and tfrecord data, not {data.source!r}'
  )


def _pixel_boxes(
  images: list[dict], image_size: tuple[int, int], drop_crowd: bool
) -> tuple[list[np.ndarray], list[np.ndarray], collections.Counter]:
  """Boxes in network-input pixels after the eval resize; what was left
  out is counted."""
  skipped: collections.Counter = collections.Counter()
  boxes_out, classes_out = [], []
  for im in images:
    h, w = im['height'], im['width']
    boxes = np.asarray(im['boxes'], np.float64).reshape(-1, 4)
    classes = np.asarray(im['classes'], np.int32)
    keep = np.ones(len(classes), bool)
    if h <= 0 or w <= 0:
      skipped['image size unknown'] += int(keep.sum())
      keep[:] = False
    scale = min(image_size[0] / max(h, 1), image_size[1] / max(w, 1))
    px = boxes * np.array([h, w, h, w]) * scale
    zero = (px[:, 2] <= px[:, 0]) | (px[:, 3] <= px[:, 1])
    skipped['zero-size'] += int((keep & zero).sum())
    keep &= ~zero
    if drop_crowd:
      crowd = np.asarray(im['is_crowd'], bool)
      skipped['crowd'] += int((keep & crowd).sum())
      keep &= ~crowd
    boxes_out.append(px[keep].astype(np.float32))
    classes_out.append(classes[keep])
  return boxes_out, classes_out, skipped


def anchor_stats(
  boxes: list[np.ndarray],
  classes: list[np.ndarray],
  anchors: np.ndarray,
  matched_threshold: float,
  unmatched_threshold: float,
) -> dict[str, np.ndarray]:
  """Per box (concatenated over images): best anchor IoU, best anchor
  index and the number of anchors the matcher made positive for it."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from effdet_jax.detection import targets  # noqa: PLC0415

  m = max([len(c) for c in classes] + [1])
  m = -(-m // 8) * 8
  anchors_j = jnp.asarray(anchors)

  @jax.jit
  def stats(b, c):
    iou = jax.vmap(lambda x: targets.iou_matrix(x, anchors_j))(b)
    matches = targets.match(
      anchors_j, b, c, matched_threshold, unmatched_threshold
    )
    rows = jnp.where(matches >= 0, matches, m)
    count = jax.vmap(lambda r: jnp.zeros(m + 1, jnp.int32).at[r].add(1)[:m])(
      rows
    )
    return iou.max(-1), iou.argmax(-1), count

  out = collections.defaultdict(list)
  for start in range(0, len(boxes), _BATCH):
    chunk = range(start, min(start + _BATCH, len(boxes)))
    b = np.zeros((_BATCH, m, 4), np.float32)
    c = -np.ones((_BATCH, m), np.int32)
    for row, i in enumerate(chunk):
      b[row, : len(classes[i])] = boxes[i]
      c[row, : len(classes[i])] = classes[i]
    best, where, count = jax.device_get(stats(b, c))
    for row, i in enumerate(chunk):
      n = len(classes[i])
      out['best_iou'].append(best[row, :n])
      out['best_anchor'].append(where[row, :n])
      out['positives'].append(count[row, :n])
  return {k: np.concatenate(v) if v else np.zeros([0]) for k, v in out.items()}


def _level_of(anchor_index: np.ndarray, model: Any) -> np.ndarray:
  from effdet_jax.detection import anchors as anchors_lib  # noqa: PLC0415

  per_level = anchors_lib.level_sizes(
    model.image_size,
    model.min_level,
    model.max_level,
    model.num_scales * len(model.aspect_ratios),
  )
  ends = np.cumsum(per_level)
  return model.min_level + np.searchsorted(ends, anchor_index, side='right')


def inspect(config: Any, split: str) -> str:
  """The report as text (see the module docstring)."""
  from effdet_jax.data import dataset_checks, sources  # noqa: PLC0415
  from effdet_jax.detection import anchors as anchors_lib  # noqa: PLC0415

  model, t = config.model, config.train
  lines = []
  try:
    class_map, _ = dataset_checks.verify(config, None, (split,))
    lines.append('start-up checks: ok')
  except dataset_checks.DatasetError as err:
    class_map = sources.class_map(config)
    lines.append(f'start-up checks: FAILED (a run would stop)\n{err}')
  names = class_map.names
  images = read_split(config, split)
  size = tuple(int(v) for v in model.image_size)
  drop_crowd = split == 'train' and bool(config.data.skip_crowd_during_training)
  boxes, classes, skipped = _pixel_boxes(images, size, drop_crowd)
  cls = np.concatenate(classes) if classes else np.zeros([0], np.int32)
  px = np.concatenate(boxes) if boxes else np.zeros([0, 4], np.float32)
  sq = np.sqrt((px[:, 2] - px[:, 0]) * (px[:, 3] - px[:, 1]))
  anchors = anchors_lib.anchors_from_config(model)
  st = anchor_stats(
    boxes, classes, anchors, t.matched_threshold, t.unmatched_threshold
  )
  levels = _level_of(st['best_anchor'], model)
  level_ids = list(range(model.min_level, model.max_level + 1))
  base = [model.anchor_scale * 2**lv for lv in level_ids]

  left = {k: v for k, v in skipped.items() if v}
  lines.append(
    f'\n{split}: {len(images)} images, {len(cls)} boxes used '
    f'(left out: {left or "none"}); image size {size[0]}x'
    f'{size[1]} (HxW) after the eval resize; training jitter '
    f'{config.data.jitter_min}..{config.data.jitter_max} scales these'
  )
  lines.append('\nboxes per class:')
  counts = collections.Counter(cls.tolist())
  for k in sorted(set(names) | set(counts)):
    lines.append(f'  {k:>4} {names.get(k, "?"):<20} {counts.get(k, 0):>7}')

  header = '  size px      boxes' + ''.join(f'     P{lv}' for lv in level_ids)
  lines.append(
    '\nbox size sqrt(w*h) in input pixels, by the level of the best anchor '
    '(anchor base size '
    + ', '.join(f'P{lv} {b:g}' for lv, b in zip(level_ids, base, strict=True))
    + ' px):'
  )
  lines.append(header)
  for lo, hi in zip(SIZE_EDGES[:-1], SIZE_EDGES[1:], strict=True):
    sel = (sq >= lo) & (sq < hi)
    if not sel.any():
      continue
    per = [int((sel & (levels == lv)).sum()) for lv in level_ids]
    label = f'{lo:g}-{hi:g}' if hi != math.inf else f'>= {lo:g}'
    lines.append(
      f'  {label:<10} {int(sel.sum()):>6}' + ''.join(f'{p:>7}' for p in per)
    )

  thr = t.matched_threshold
  below = st['best_iou'] < thr
  lost = st['positives'] == 0
  lines.append(
    f'\nanchor coverage (matched_threshold {thr}; the matcher force-matches '
    "each box's best anchor, so 'below threshold' boxes still get one):"
  )
  lines.append(
    '  class                  boxes  no anchor IoU>=thr  no positive anchor'
    '  mean positives'
  )
  for k in sorted(counts):
    sel = cls == k
    lines.append(
      f'  {names.get(k, str(k)):<20} {int(sel.sum()):>7} '
      f'{int((sel & below).sum()):>19} {int((sel & lost).sum()):>19} '
      f'{float(st["positives"][sel].mean()):>15.1f}'
    )
  lines.append(
    f'  {"all":<20} {len(cls):>7} {int(below.sum()):>19} '
    f'{int(lost.sum()):>19} '
    f'{float(st["positives"].mean()) if len(cls) else 0.0:>15.1f}'
  )
  return '\n'.join(lines)


def _define_flags() -> None:
  """The program's flags; defined only when it runs as a program (absl
  flags are process-global: importing two tools into one process must not
  define --config twice)."""
  config_flags.DEFINE_config_file('config', None, 'Run config.')
  flags.DEFINE_enum('split', 'train', ['train', 'eval'], 'Split.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if flags.FLAGS.config is None:
    raise app.UsageError('--config is required')
  print(inspect(flags.FLAGS.config, flags.FLAGS.split))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
