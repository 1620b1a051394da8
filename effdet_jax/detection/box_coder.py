"""The official Faster R-CNN box coder without scale factors.

Official: `efficientdet/object_detection/faster_rcnn_box_coder.py:
FasterRcnnBoxCoder` (encode) and `efficientdet/tf2/anchors.py:
decode_box_outputs` (decode).

encode: ty = (yc - yca) / ha, tx = (xc - xca) / wa, th = log(h / ha),
tw = log(w / wa), with h, w, ha, wa clamped to >= 1e-8; order [ty, tx, th,
tw]. decode inverts it with no clamp before exp. Boxes are yxyx; any leading
batch dimensions broadcast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
EPSILON = 1e-8


def _center_size(boxes: Array) -> tuple[Array, Array, Array, Array]:
  ymin, xmin, ymax, xmax = jnp.moveaxis(boxes, -1, 0)
  return (ymin + ymax) / 2, (xmin + xmax) / 2, ymax - ymin, xmax - xmin


def encode(boxes: Array, anchors: Array) -> Array:
  """Regression targets `[..., 4]` of `boxes` relative to `anchors`."""
  yc, xc, h, w = _center_size(boxes)
  yca, xca, ha, wa = _center_size(anchors)
  ha, wa = jnp.maximum(ha, EPSILON), jnp.maximum(wa, EPSILON)
  h, w = jnp.maximum(h, EPSILON), jnp.maximum(w, EPSILON)
  return jnp.stack(
    [(yc - yca) / ha, (xc - xca) / wa, jnp.log(h / ha), jnp.log(w / wa)], -1
  )


def decode(codes: Array, anchors: Array) -> Array:
  """Boxes `[..., 4]` (yxyx) from regression outputs and anchors."""
  yca, xca, ha, wa = _center_size(anchors)
  ty, tx, th, tw = jnp.moveaxis(codes, -1, 0)
  w = jnp.exp(tw) * wa
  h = jnp.exp(th) * ha
  yc = ty * ha + yca
  xc = tx * wa + xca
  return jnp.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], -1)
