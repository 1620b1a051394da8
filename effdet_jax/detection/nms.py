"""Static-shape NMS in JAX, equal to TensorFlow's NonMaxSuppressionV5.

TF's kernel keeps a priority queue and decays a candidate lazily, only by
the boxes selected since it was last looked at. Scores only ever decrease, so
that is the same as the eager form used here: repeatedly take the highest
current score (lowest index on ties, as TF's queue), stop when it is not
above `score_threshold`, then decay (soft) or drop (hard, IoU > threshold)
the rest. Soft-NMS weight: exp(-0.5 * IoU**2 / soft_nms_sigma), no hard cut
(TF ignores iou_threshold in soft mode). IoU as TF computes it: corners
sorted, 0 when either box has no area, no "+1".

`classes` given: boxes only suppress boxes of their own class. Selecting in
global score order then yields exactly the top-`max_output` of running NMS
per class and merging (the official per-class path), since classes do not
interact and each class's selected scores are non-increasing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _tf_iou(box: Array, boxes: Array) -> Array:
  """IoU of one box `[4]` with `[K, 4]`, as TF's NMS kernel computes it."""
  y0, x0 = jnp.minimum(box[0], box[2]), jnp.minimum(box[1], box[3])
  y1, x1 = jnp.maximum(box[0], box[2]), jnp.maximum(box[1], box[3])
  ys0 = jnp.minimum(boxes[:, 0], boxes[:, 2])
  xs0 = jnp.minimum(boxes[:, 1], boxes[:, 3])
  ys1 = jnp.maximum(boxes[:, 0], boxes[:, 2])
  xs1 = jnp.maximum(boxes[:, 1], boxes[:, 3])
  area = (y1 - y0) * (x1 - x0)
  areas = (ys1 - ys0) * (xs1 - xs0)
  ih = jnp.maximum(jnp.minimum(y1, ys1) - jnp.maximum(y0, ys0), 0)
  iw = jnp.maximum(jnp.minimum(x1, xs1) - jnp.maximum(x0, xs0), 0)
  inter = ih * iw
  union = area + areas - inter
  ok = (area > 0) & (areas > 0)
  return jnp.where(ok, inter / jnp.where(ok, union, 1.0), 0.0)


def non_max_suppression(
  boxes: Array,
  scores: Array,
  max_output: int,
  iou_threshold: float = 0.5,
  score_threshold: float = float('-inf'),
  soft_nms_sigma: float = 0.0,
  classes: Array | None = None,
) -> tuple[Array, Array, Array]:
  """NMS of one image.

  Args:
    boxes: `[K, 4]` yxyx. scores: `[K]` (use -inf to exclude a candidate).
    max_output: number of output slots.
    soft_nms_sigma: > 0 selects Gaussian soft-NMS (TF's parameter: the
      official code passes sigma / 2 = 0.25).
    classes: `[K]` ints for class-aware suppression, or None.

  Returns:
    indices `[max_output]` (-1 past the valid ones), scores `[max_output]`
    (after soft decay; 0 past the valid ones), valid count (int32).
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  classes = None if classes is None else jnp.asarray(classes)
  soft = soft_nms_sigma > 0
  scale = -0.5 / soft_nms_sigma if soft else 0.0
  neg_inf = jnp.float32(-jnp.inf)

  def body(t, state):
    current, out_idx, out_scores, count = state
    i = jnp.argmax(current).astype(jnp.int32)
    s = current[i]
    ok = s > score_threshold
    out_idx = out_idx.at[t].set(jnp.where(ok, i, -1))
    out_scores = out_scores.at[t].set(jnp.where(ok, s, 0.0))
    iou = _tf_iou(boxes[i], boxes)
    same = True if classes is None else classes == classes[i]
    if soft:
      decayed = current * jnp.exp(scale * iou * iou)
      updated = jnp.where(same, decayed, current)
    else:
      updated = jnp.where(same & (iou > iou_threshold), neg_inf, current)
    updated = updated.at[i].set(neg_inf)
    current = jnp.where(ok, updated, current)
    return current, out_idx, out_scores, count + ok.astype(jnp.int32)

  init = (
    scores,
    jnp.full((max_output,), -1, jnp.int32),
    jnp.zeros((max_output,), jnp.float32),
    jnp.int32(0),
  )
  _, idx, out_scores, count = jax.lax.fori_loop(0, max_output, body, init)
  return idx, out_scores, count
