"""Per-anchor targets on device: IoU, the official argmax matcher, encoding.

Facts (official
`efficientdet/object_detection/argmax_matcher.py: ArgMaxMatcher`,
`efficientdet/object_detection/target_assigner.py: TargetAssigner`,
`efficientdet/object_detection/region_similarity_calculator.py:
IouSimilarity`, `efficientdet/tf2/anchors.py: AnchorLabeler.label_anchors`):
* IoU without the "+1" convention, 0 where the intersection is 0;
* each anchor takes its best box (first on ties): IoU >= matched_threshold
  -> positive, < unmatched_threshold -> negative (-1), in between ->
  ignored (-2, only when the thresholds differ);
* force match: each box's best anchor (first on ties) is matched to it
  whatever the IoU; when several boxes force-match one anchor the lowest box
  index wins;
* class target = class id - 1 for matched anchors, -1 otherwise (ignored
  anchors too, as officially); box target = encoding of the matched box, 0
  otherwise; num_positives counts anchors whose match is not -1.

Our rules for inputs the official pipeline never passes (documented in
docs/detection.md): entries with class <= 0 are padding; a box with
ymin > ymax or xmin > xmax has its corners swapped; a box of zero area is
ignored like padding (the official pipeline drops such boxes before
assignment, in `efficientdet/dataloader.py:
DetectionInputProcessor.resize_and_crop_boxes`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from effdet_jax import ops
from effdet_jax.detection import box_coder

Array = jax.Array


class Targets(NamedTuple):
  """Targets for a batch, flat over anchors in the official order."""

  cls_targets: Array  # [B, N] int32: class id - 1, or -1
  box_targets: Array  # [B, N, 4] float32 encoded, 0 for non-positives
  positive: Array  # [B, N] bool
  negative: Array  # [B, N] bool
  ignored: Array  # [B, N] bool (between the two thresholds)
  num_positives: Array  # [B] float32


def normalize_corners(boxes: Array) -> Array:
  """yxyx boxes with min/max corners in order."""
  ymin = jnp.minimum(boxes[..., 0], boxes[..., 2])
  ymax = jnp.maximum(boxes[..., 0], boxes[..., 2])
  xmin = jnp.minimum(boxes[..., 1], boxes[..., 3])
  xmax = jnp.maximum(boxes[..., 1], boxes[..., 3])
  return jnp.stack([ymin, xmin, ymax, xmax], -1)


def iou_matrix(boxes: Array, anchors: Array) -> Array:
  """Pairwise IoU `[M, N]` of yxyx boxes `[M, 4]` and anchors `[N, 4]`."""
  b = boxes[:, None, :]
  a = anchors[None, :, :]
  ih = jnp.maximum(
    jnp.minimum(b[..., 2], a[..., 2]) - jnp.maximum(b[..., 0], a[..., 0]), 0
  )
  iw = jnp.maximum(
    jnp.minimum(b[..., 3], a[..., 3]) - jnp.maximum(b[..., 1], a[..., 1]), 0
  )
  inter = ih * iw
  area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
  union = area_b + area_a - inter
  return jnp.where(inter == 0, 0.0, inter / jnp.where(inter == 0, 1.0, union))


def _best_matches(
  anchors: Array, boxes: Array, valid: Array, chunk: int
) -> tuple[Array, Array, Array]:
  """Per anchor the best box (value, first index); per box the best anchor.

  Rows are visited in chunks, stopping after the last valid row of the
  batch: padded rows (usually most of `max_instances_per_image`) cost
  nothing, and a `[B, chunk, N]` IoU block stays in cache (4-9x faster than
  one dense `[B, M, N]` IoU on the CPU). Invalid rows are moved far away so
  their IoU is 0 and never beats a real box; the caller excludes them from
  force matching.
  """
  far = jnp.float32(-1e9)
  boxes = jnp.where(valid[..., None], boxes, far)
  return best_matches(anchors, boxes, valid, chunk)


@ops.backend_form('best_matches')
def best_matches(
  anchors: Array, boxes: Array, valid: Array, chunk: int
) -> tuple[Array, Array, Array]:
  """`_best_matches` for boxes whose invalid rows are far away already."""
  b, m, _ = boxes.shape
  n = anchors.shape[0]
  far = jnp.float32(-1e9)
  pad = (-m) % chunk
  boxes = jnp.pad(boxes, ((0, 0), (0, pad), (0, 0)), constant_values=far)
  area_b = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
  area_a = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
  last = jnp.max(jnp.where(valid, jnp.arange(1, m + 1), 0))

  def body(carry):
    start, best_val, best_row, best_col = carry
    rows = lax.dynamic_slice_in_dim(boxes, start, chunk, 1)[:, :, None, :]
    rows_area = lax.dynamic_slice_in_dim(area_b, start, chunk, 1)[..., None]
    a = anchors[None, None]
    ih = jnp.minimum(rows[..., 2], a[..., 2]) - jnp.maximum(
      rows[..., 0], a[..., 0]
    )
    iw = jnp.minimum(rows[..., 3], a[..., 3]) - jnp.maximum(
      rows[..., 1], a[..., 1]
    )
    inter = jnp.maximum(ih, 0) * jnp.maximum(iw, 0)
    # Anchors have positive area, so the union is never 0.
    iou = inter / (rows_area + area_a - inter)  # [B, chunk, N]
    row = jnp.argmax(iou, axis=1).astype(jnp.int32)
    val = jnp.take_along_axis(iou, row[:, None], 1)[:, 0]
    better = val > best_val  # strict: the earlier row wins a tie
    best_val = jnp.where(better, val, best_val)
    best_row = jnp.where(better, row + start, best_row)
    col = jnp.argmax(iou, axis=2).astype(jnp.int32)
    best_col = lax.dynamic_update_slice_in_dim(best_col, col, start, 1)
    return start + chunk, best_val, best_row, best_col

  init = (
    jnp.int32(0),
    jnp.full((b, n), -1.0, jnp.float32),
    jnp.zeros((b, n), jnp.int32),
    jnp.zeros((b, m + pad), jnp.int32),
  )
  _, best_val, best_row, best_col = lax.while_loop(
    lambda c: c[0] < last, body, init
  )
  return best_val, best_row, best_col[:, :m]


def _matches(
  best_val: Array,
  best_row: Array,
  best_col: Array,
  valid: Array,
  matched_threshold: float,
  unmatched_threshold: float,
) -> Array:
  """Official ArgMaxMatcher decisions for one image, `[N]` int32."""
  m, n = valid.shape[0], best_val.shape[0]
  matches = jnp.where(
    best_val >= matched_threshold,
    best_row,
    jnp.where(best_val < unmatched_threshold, -1, -2),
  )
  # Force match: each valid box's best anchor; the lowest box index wins.
  rows = jnp.where(valid, jnp.arange(m, dtype=jnp.int32), m)
  force_row = jnp.full((n,), m, jnp.int32).at[best_col].min(rows)
  return jnp.where(force_row < m, force_row, matches).astype(jnp.int32)


def _targets_one(anchors, boxes, classes, matches) -> Targets:
  positive = matches >= 0
  idx = jnp.maximum(matches, 0)
  cls_targets = jnp.where(positive, classes[idx] - 1, -1).astype(jnp.int32)
  encoded = box_coder.encode(boxes[idx], anchors)
  return Targets(
    cls_targets=cls_targets,
    box_targets=jnp.where(positive[:, None], encoded, 0.0),
    positive=positive,
    negative=matches == -1,
    ignored=matches == -2,
    num_positives=jnp.sum(matches != -1).astype(jnp.float32),
  )


def assign(
  anchors: Array,
  boxes: Array,
  classes: Array,
  matched_threshold: float = 0.5,
  unmatched_threshold: float = 0.5,
  chunk: int = 8,
) -> Targets:
  """Targets for a padded batch.

  Args:
    anchors: `[N, 4]` yxyx pixels (`anchors.generate_anchors`).
    boxes: `[B, M, 4]` yxyx pixels in the network-input frame.
    classes: `[B, M]` int 1-based class ids; <= 0 (e.g. -1) is padding.
    matched_threshold / unmatched_threshold: the matcher's (0.5 / 0.5).
    chunk: boxes per IoU block (speed only).
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  boxes = normalize_corners(jnp.asarray(boxes, jnp.float32))
  classes = jnp.asarray(classes, jnp.int32)
  matches = match(
    anchors, boxes, classes, matched_threshold, unmatched_threshold, chunk
  )
  return jax.vmap(lambda b, c, mt: _targets_one(anchors, b, c, mt))(
    boxes, classes, matches
  )


def match(
  anchors: Array,
  boxes: Array,
  classes: Array,
  matched_threshold: float = 0.5,
  unmatched_threshold: float = 0.5,
  chunk: int = 8,
) -> Array:
  """The matcher's decision per anchor, `[B, N]` int32: the matched box
  index, -1 negative, -2 ignored (arguments as `assign`; boxes with their
  corners in order). `tools/inspect_data` counts boxes no anchor got."""
  area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
  valid = (classes > 0) & (area > 0)
  best_val, best_row, best_col = _best_matches(anchors, boxes, valid, chunk)
  return jax.vmap(
    lambda v, r, c, ok: _matches(
      v, r, c, ok, matched_threshold, unmatched_threshold
    )
  )(best_val, best_row, best_col, valid)
