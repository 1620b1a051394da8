"""Detection losses with the official semantics (official
`det_model_fn.py: focal_loss, _box_loss, detection_loss`).

* Focal loss per (anchor, class): alpha_t * (1 - p_t)**gamma * CE, where
  alpha_t and p_t use the un-smoothed one-hot labels and label smoothing only
  changes the CE target (y' = y(1 - ls) + ls / 2); background (-1) is an
  all-zero one-hot row.
* Huber (delta) on encoded box coordinates, masked elementwise by
  `box_target != 0`, divided by 4 * N.
* N = positives summed over the whole batch + 1. Under `jax.jit` on a sharded
  global batch the sum is over the **global** batch (TF1/TPU normalised per
  core; this is the issue's choice and makes the loss independent of the
  device count).
* Optional IoU-family loss (iou, giou, diou, ciou) on decoded boxes of the
  positive anchors, / (4 * N) as officially, times `iou_loss_weight`. The
  official TF2 code tiles anchors batch-major against level-major outputs
  (`tf2/train_lib.py`); we decode every anchor with its own box.
* total = cls + box_loss_weight * box (+ iou_loss_weight * iou).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from effdet_jax import ops
from effdet_jax.detection import box_coder, levels
from effdet_jax.detection.targets import Targets

Array = jax.Array


def focal_loss(
  logits: Array,
  labels: Array,
  alpha: float = 0.25,
  gamma: float = 1.5,
  label_smoothing: float = 0.0,
) -> Array:
  """Elementwise sigmoid focal loss (not normalised)."""
  logits = logits.astype(jnp.float32)
  p = jax.nn.sigmoid(logits)
  p_t = labels * p + (1 - labels) * (1 - p)
  alpha_t = labels * alpha + (1 - labels) * (1 - alpha)
  modulator = (1.0 - p_t) ** gamma
  y = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
  # Stable sigmoid cross-entropy: max(z, 0) - z*y + log(1 + exp(-|z|)).
  ce = (
    jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  )
  return alpha_t * modulator * ce


@ops.backend_form('focal_loss_sum')
def focal_loss_sum(
  logits: Array,
  cls_ids: Array,
  num_classes: int,
  alpha: float,
  gamma: float,
  scale: Array | float = 1.0,
) -> Array:
  """Sum of the focal loss of one level, times `scale`.

  Args:
    logits: `[B, H, W, A * num_classes]` class outputs of one level.
    cls_ids: `[B, H * W * A]` int class index (0-based) per anchor, or any
      value outside `[0, num_classes)` for background (an all-zero one-hot
      row, as the official `one_hot` of -1).
    num_classes, alpha, gamma: the loss constants.
    scale: a float32 scalar (the loss normaliser's inverse).

  Returns:
    A float32 scalar.
  """
  b = logits.shape[0]
  labels = jax.nn.one_hot(cls_ids, num_classes, dtype=jnp.float32)
  x = logits.reshape(b, -1, num_classes)
  return scale * jnp.sum(focal_loss(x, labels, alpha, gamma))


def huber(error: Array, delta: float = 0.1) -> Array:
  a = jnp.abs(error)
  return jnp.where(a <= delta, 0.5 * error**2, delta * a - 0.5 * delta**2)


def box_iou_family(pred: Array, target: Array, kind: str) -> Array:
  """IoU / GIoU / DIoU / CIoU of yxyx boxes `[..., 4]` (official iou_utils)."""
  py0, px0, py1, px1 = jnp.moveaxis(pred, -1, 0)
  ty0, tx0, ty1, tx1 = jnp.moveaxis(target, -1, 0)
  pw, ph = jnp.maximum(px1 - px0, 0), jnp.maximum(py1 - py0, 0)
  tw, th = jnp.maximum(tx1 - tx0, 0), jnp.maximum(ty1 - ty0, 0)
  iw = jnp.maximum(jnp.minimum(px1, tx1) - jnp.maximum(px0, tx0), 0)
  ih = jnp.maximum(jnp.minimum(py1, ty1) - jnp.maximum(py0, ty0), 0)
  inter = iw * ih
  union = pw * ph + tw * th - inter
  iou = _div_no_nan(inter, union)
  if kind == 'iou':
    return iou
  ew = jnp.maximum(jnp.maximum(px1, tx1) - jnp.minimum(px0, tx0), 0)
  eh = jnp.maximum(jnp.maximum(py1, ty1) - jnp.minimum(py0, ty0), 0)
  if kind == 'giou':
    enclose = ew * eh
    return iou - _div_no_nan(enclose - union, enclose)
  if kind in ('diou', 'ciou'):
    dy = (py0 + py1 - ty0 - ty1) / 2
    dx = (px0 + px1 - tx0 - tx1) / 2
    diou = iou - _div_no_nan(dy**2 + dx**2, ew**2 + eh**2)
    if kind == 'diou':
      return diou
    v = _aspect_term(ph, pw, th, tw)
    alpha = jax.lax.stop_gradient(_div_no_nan(v, (1 - iou) + v))
    return diou - alpha * v
  raise ValueError(f'unknown iou_loss_type {kind!r}: iou|giou|diou|ciou')


def _div_no_nan(a: Array, b: Array) -> Array:
  return jnp.where(b == 0, 0.0, a / jnp.where(b == 0, 1.0, b))


def _aspect_term(ph, pw, th, tw):
  """CIoU v = 4/pi^2 (atan(wt/ht) - atan(w/h))^2 (zero where undefined)."""
  ratio = lambda w, h: jnp.arctan(_div_no_nan(w, h))  # noqa: E731
  return 4 / math.pi**2 * (ratio(tw, th) - ratio(pw, ph)) ** 2


def detection_loss(
  class_outputs: Sequence[Array],
  box_outputs: Sequence[Array],
  targets: Targets,
  *,
  num_classes: int,
  alpha: float = 0.25,
  gamma: float = 1.5,
  label_smoothing: float = 0.0,
  delta: float = 0.1,
  box_loss_weight: float = 50.0,
  iou_loss_type: str | None = None,
  iou_loss_weight: float = 1.0,
  anchors: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """Total loss and its parts (`cls_loss`, `box_loss`, `iou_loss`, ...).

  Args:
    class_outputs / box_outputs: the model's per-level outputs.
    targets: from `targets.assign` for the same anchors.
    anchors: `[N, 4]`, needed only for an IoU-family loss.
  """
  normalizer = jnp.sum(targets.num_positives) + 1.0
  b = class_outputs[0].shape[0]
  cls_loss, box_sum, start = 0.0, 0.0, 0
  # Per level: concatenating the levels costs a copy forward and backward.
  for cls_l, box_l in zip(class_outputs, box_outputs, strict=True):
    n = box_l.size // (4 * b)
    ids = targets.cls_targets[:, start : start + n]
    if label_smoothing:
      one_hot = jax.nn.one_hot(ids, num_classes, dtype=jnp.float32)
      logits = cls_l.astype(jnp.float32).reshape(b, n, num_classes)
      cls_loss += (
        jnp.sum(focal_loss(logits, one_hot, alpha, gamma, label_smoothing))
        / normalizer
      )
    else:
      # Normalised inside: a backend form may scale the gradient as it
      # writes it.
      cls_loss += focal_loss_sum(
        cls_l, ids, num_classes, alpha, gamma, scale=1.0 / normalizer
      )
    box_t = targets.box_targets[:, start : start + n]
    err = box_l.astype(jnp.float32).reshape(b, n, 4) - box_t
    mask = (box_t != 0.0).astype(jnp.float32)
    box_sum += jnp.sum(huber(err, delta) * mask)
    start += n
  box_loss = box_sum / (4.0 * normalizer)
  total = cls_loss + box_loss_weight * box_loss
  parts = {
    'cls_loss': cls_loss,
    'box_loss': box_loss,
    'num_positives': jnp.sum(targets.num_positives),
  }
  if iou_loss_type:
    if anchors is None:
      raise ValueError('an IoU-family loss needs the anchors')
    anchors = jnp.asarray(anchors, jnp.float32)
    box = levels.merge_levels(box_outputs, 4).astype(jnp.float32)
    pred = box_coder.decode(box, anchors)
    tgt = box_coder.decode(targets.box_targets, anchors)
    pos = targets.positive.astype(jnp.float32)
    iou = box_iou_family(pred, tgt, iou_loss_type)
    iou_loss = jnp.sum(pos * (1.0 - iou)) / (4.0 * normalizer)
    parts['iou_loss'] = iou_loss
    total = total + iou_loss_weight * iou_loss
  parts['total_loss'] = total
  return total, parts


def loss_kwargs(config: Any) -> dict[str, Any]:
  """`detection_loss` keyword arguments from a run config (model + train)."""
  t = config.train
  return dict(
    num_classes=config.model.num_classes,
    alpha=t.alpha,
    gamma=t.gamma,
    label_smoothing=t.label_smoothing,
    delta=t.delta,
    box_loss_weight=t.box_loss_weight,
    iou_loss_type=t.iou_loss_type or None,
    iou_loss_weight=t.iou_loss_weight,
  )
