"""The anchor matcher's IoU maxima as an XLA:CPU custom call.

`match_cpu.cc` computes what `detection.targets._best_matches` does in jnp
(per anchor the best box and its IoU, per box the best anchor) with the
same arithmetic, parallel over anchors and without the while loop over
blocks of boxes that XLA:CPU ran on one thread (~30 ms of the D0 b8 train
step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effdet_jax.cpu import library as cpu_library


def supports(dtype) -> bool:
  """f32 boxes, kernels on (one CPU device)."""
  return jnp.dtype(dtype) == jnp.float32 and cpu_library.enabled()


def best_matches(anchors, boxes, valid):
  """(best_val [B, N], best_row [B, N], best_col [B, M]) for anchors
  [N, 4] and boxes [B, M, 4] (yxyx, corners in order; invalid rows moved
  far away, as `_best_matches` does), `valid` [B, M] bool."""
  b, m, _ = boxes.shape
  n = anchors.shape[0]
  return cpu_library.call(
    'EffdetBestMatches',
    (
      jax.ShapeDtypeStruct((b, n), jnp.float32),
      jax.ShapeDtypeStruct((b, n), jnp.int32),
      jax.ShapeDtypeStruct((b, m), jnp.int32),
    ),
    boxes,
    valid.astype(jnp.int32),
    anchors.T,
  )
