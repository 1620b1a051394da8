"""Post-processing: head outputs -> `Detections`.

Both official paths of `efficientdet/tf2/postprocess.py` (after `pre_nms`):
* `mode='global'` (`postprocess_global`): class-agnostic NMS, boxes clipped
  to [0, image_size] in network-input pixels;
* `mode='per_class'` (`postprocess_per_class`, official COCO eval): NMS per
  class, top `max_detections` overall, no clipping.
Pre-NMS selection: `max_nms_inputs=0` keeps every anchor with its best class
(official default for inference and the training-time COCO callback);
`> 0` keeps the top-k (anchor, class) logits (5000 in official eval).
Scores are sigmoids after selection; boxes are decoded with no clamp, then
multiplied by `image_scale` (original pixels per input pixel). Classes are
1-based ids; unused slots have class -1, score 0 and a zero box.

Non-finite logits, box outputs or decoded boxes (exp overflow) never crash:
such anchors are dropped and counted per image in `Detections.num_nonfinite`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from effdet_jax import registry
from effdet_jax.detection import box_coder, levels, nms

Array = jax.Array


class Detections(NamedTuple):
  boxes: Array  # [B, K, 4] yxyx in original-image pixels
  scores: Array  # [B, K]
  classes: Array  # [B, K] int32 1-based ids, -1 in unused slots
  valid_count: Array  # [B] int32
  num_nonfinite: Array  # [B] int32 anchors dropped for NaN/inf


NMS_METHODS = ('gaussian', 'hard')
NMS_MODES = ('global', 'per_class')


def postprocess(
  class_outputs: Sequence[Array],
  box_outputs: Sequence[Array],
  anchors: Array,
  image_scale: Array | None = None,
  *,
  num_classes: int,
  image_size: Any,
  mode: str = 'per_class',
  method: str = 'gaussian',
  iou_threshold: float | None = None,
  sigma: float | None = None,
  score_threshold: float | None = None,
  max_nms_inputs: int = 0,
  max_detections: int = 100,
) -> Detections:
  """Official post-processing of a batch of head outputs.

  Args:
    class_outputs / box_outputs: the model's per-level outputs.
    anchors: `[N, 4]` for the network input size.
    image_scale: `[B]` original pixels per input pixel (None: 1).
    image_size: network input (H, W) for the global path's clipping.
    method: 'gaussian' (soft-NMS, sigma default 0.5, passed to the kernel
      as sigma / 2; score threshold default 0.001) or 'hard' (IoU default
      0.5; score threshold default -inf).
  """
  if mode not in NMS_MODES:
    raise ValueError(f'unknown nms mode {mode!r}; valid: {NMS_MODES}')
  if method not in NMS_METHODS:
    raise ValueError(f'unknown nms method {method!r}; valid: {NMS_METHODS}')
  if method == 'gaussian':
    soft_sigma = (sigma or 0.5) / 2.0
    thresh = score_threshold or 0.001
    iou_thr = 0.5
  else:
    soft_sigma = 0.0
    thresh = float('-inf') if score_threshold is None else score_threshold
    iou_thr = iou_threshold or 0.5

  logits = levels.merge_levels(class_outputs, num_classes).astype(jnp.float32)
  codes = levels.merge_levels(box_outputs, 4).astype(jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  b, n, _ = logits.shape
  # Decoding every anchor is cheap next to NMS and lets one rule count
  # anchors with any non-finite logit, code or decoded box (exp overflow).
  all_boxes = box_coder.decode(codes, anchors)
  finite = jnp.all(jnp.isfinite(logits), -1) & jnp.all(
    jnp.isfinite(all_boxes), -1
  )
  num_nonfinite = jnp.sum(~finite, axis=1).astype(jnp.int32)
  logits = jnp.where(finite[..., None], logits, -jnp.inf)

  if max_nms_inputs > 0:
    k = min(max_nms_inputs, n * num_classes)
    top, flat_idx = jax.lax.top_k(logits.reshape(b, -1), k)
    anchor_idx = flat_idx // num_classes
    classes = flat_idx % num_classes
  else:
    top = jnp.max(logits, -1)
    classes = jnp.argmax(logits, -1)
    anchor_idx = jnp.broadcast_to(jnp.arange(n), (b, n))
  boxes = jnp.take_along_axis(all_boxes, anchor_idx[..., None], axis=1)
  boxes = jnp.where(jnp.isfinite(boxes), boxes, 0.0)
  scores = jnp.where(jnp.isfinite(top), jax.nn.sigmoid(top), -jnp.inf)

  def one(bx, sc, cl):
    idx, s, count = nms.non_max_suppression(
      bx,
      sc,
      max_detections,
      iou_thr,
      thresh,
      soft_sigma,
      classes=cl if mode == 'per_class' else None,
    )
    valid = idx >= 0
    safe = jnp.maximum(idx, 0)
    out_boxes = jnp.where(valid[:, None], bx[safe], 0.0)
    out_classes = jnp.where(valid, cl[safe] + 1, -1).astype(jnp.int32)
    return out_boxes, s, out_classes, count

  out_boxes, out_scores, out_classes, count = jax.vmap(one)(
    boxes, scores, classes
  )
  if mode == 'global':
    h, w = registry.parse_image_size(image_size)
    limit = jnp.array([h, w, h, w], jnp.float32)
    out_boxes = jnp.clip(out_boxes, 0.0, limit)
  if image_scale is not None:
    out_boxes = out_boxes * jnp.asarray(image_scale, jnp.float32)[:, None, None]
  return Detections(out_boxes, out_scores, out_classes, count, num_nonfinite)


def postprocess_kwargs(config: Any) -> dict[str, Any]:
  """`postprocess` keyword arguments from a run config (model + eval)."""
  e = config.eval
  return dict(
    num_classes=config.model.num_classes,
    image_size=config.model.image_size,
    mode=e.nms_mode,
    method=e.nms_method,
    iou_threshold=e.nms_iou_threshold,
    sigma=e.nms_sigma,
    score_threshold=e.nms_score_threshold,
    max_nms_inputs=e.max_nms_inputs,
    max_detections=e.max_detections_per_image,
  )
