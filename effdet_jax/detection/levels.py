"""Per-level head outputs <-> flat per-anchor arrays (official order)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def merge_levels(outputs: Sequence[Array], channels: int) -> Array:
  """`[B, H_l, W_l, A*channels]` per level -> `[B, N, channels]`.

  The anchor index runs level -> y -> x -> anchor, as the anchors do.
  """
  b = outputs[0].shape[0]
  return jnp.concatenate([o.reshape(b, -1, channels) for o in outputs], axis=1)


def split_levels(flat: Array, shapes: Sequence[tuple[int, ...]]) -> list[Array]:
  """Inverse of `merge_levels`: `[B, N, ...]` -> per-level `shapes`."""
  out, start = [], 0
  for shape in shapes:
    size = 1
    for d in shape[1:]:
      size *= d
    n = size // (flat[0, 0].size if flat.ndim > 2 else 1)
    out.append(flat[:, start : start + n].reshape(shape))
    start += n
  return out
