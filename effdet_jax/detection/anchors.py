"""Anchor boxes, as the official `tf2/anchors.Anchors` builds them.

Facts (`efficientdet/tf2/anchors.py: Anchors._generate_configs`,
`Anchors._generate_boxes`; `efficientdet/utils.py: get_feat_sizes`): per
level min..max, feature sizes by ceil-halving from the image size;
stride = image / feature size (a float: lite0's P7 is 320 / 3); for each
octave s (outer) and aspect ratio r (inner) a box of
`anchor_scale * stride * 2**(s / num_scales)` scaled by (sqrt(r), 1/sqrt(r))
for a scalar r or by (r[0], r[1]) for an explicit (w, h) pair; centres at
`arange(stride / 2, size, stride)`; yxyx absolute pixels, not clipped;
global order level -> y -> x -> anchor. Computed in float64, returned as
float32.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from effdet_jax import registry


def feat_sizes(
  image_size: tuple[int, int], max_level: int
) -> list[tuple[int, int]]:
  """Feature map (H, W) for levels 0..max_level (official get_feat_sizes)."""
  h, w = image_size
  sizes = [(h, w)]
  for _ in range(max_level):
    h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    sizes.append((h, w))
  return sizes


def _aspect_xy(r: Any) -> tuple[float, float]:
  if isinstance(r, (int, float)):
    ax = float(np.sqrt(r))
    return ax, 1.0 / ax
  ax, ay = r
  return float(ax), float(ay)


def generate_anchors(
  image_size: Any,
  min_level: int,
  max_level: int,
  num_scales: int,
  aspect_ratios: Sequence[Any],
  anchor_scale: float | Sequence[float],
) -> np.ndarray:
  """All anchors `[N, 4]` (yxyx pixels, float32) in the official order.

  Args:
    image_size: int, (H, W) or the official 'WxH' string.
    aspect_ratios: scalars w/h (-> (sqrt r, 1/sqrt r)) or explicit (w, h)
      multiplier pairs, e.g. effdet's ((1, 1), (1.4, 0.7), (0.7, 1.4)).
    anchor_scale: one value, or one per level.
  """
  h, w = registry.parse_image_size(image_size)
  sizes = feat_sizes((h, w), max_level)
  num_levels = max_level - min_level + 1
  if isinstance(anchor_scale, (int, float)):
    scales = [float(anchor_scale)] * num_levels
  else:
    scales = [float(s) for s in anchor_scale]
    if len(scales) != num_levels:
      raise ValueError(
        f'anchor_scale has {len(scales)} values for {num_levels} levels'
      )
  levels = []
  for i, level in enumerate(range(min_level, max_level + 1)):
    fh, fw = sizes[level]
    stride_y, stride_x = h / fh, w / fw
    y = np.arange(stride_y / 2, h, stride_y)
    x = np.arange(stride_x / 2, w, stride_x)
    xv, yv = np.meshgrid(x, y)
    yv, xv = yv.reshape(-1), xv.reshape(-1)
    per_anchor = []
    for octave in range(num_scales):
      for r in aspect_ratios:
        ax, ay = _aspect_xy(r)
        base = scales[i] * 2 ** (octave / num_scales)
        hx = base * stride_x * ax / 2.0
        hy = base * stride_y * ay / 2.0
        per_anchor.append(np.stack([yv - hy, xv - hx, yv + hy, xv + hx], -1))
    # [HW, A, 4] -> level order y, x, anchor.
    levels.append(np.stack(per_anchor, axis=1).reshape(-1, 4))
  return np.concatenate(levels, axis=0).astype(np.float32)


def anchors_from_config(model_cfg: Any, image_size: Any = None) -> np.ndarray:
  """Anchors for a `model` config section (its `image_size` by default)."""
  return generate_anchors(
    model_cfg['image_size'] if image_size is None else image_size,
    model_cfg['min_level'],
    model_cfg['max_level'],
    model_cfg['num_scales'],
    model_cfg['aspect_ratios'],
    model_cfg['anchor_scale'],
  )


def level_sizes(
  image_size: Any, min_level: int, max_level: int, num_anchors: int
) -> list[int]:
  """Number of anchors per level (to split flat targets per level)."""
  sizes = feat_sizes(registry.parse_image_size(image_size), max_level)
  return [
    sizes[lvl][0] * sizes[lvl][1] * num_anchors
    for lvl in range(min_level, max_level + 1)
  ]
