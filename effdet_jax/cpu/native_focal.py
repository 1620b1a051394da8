"""The summed focal loss of one level as a compiled XLA:CPU custom call.

`effdet_jax.detection.focal` writes the loss and its gradient as single
elementwise passes, but XLA:CPU splits each into four or five fusions
over the `[B, H, W, A*C]` logits, recomputing exp and log1p in each (~0.1 s
of the D0 train step at batch 8). `focal_cpu.cc` reads the logits once
and writes the loss sum and the gradient together; the backward pass only
scales that gradient. Same function as the jnp form
(tests/test_native_kernels.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from effdet_jax.cpu import library as cpu_library


def supports(dtype) -> bool:
  """f32 logits and `cpu_library.enabled()`."""
  return jnp.dtype(dtype) == jnp.float32 and cpu_library.enabled()


def _loss_and_grad(logits, cls_ids, scale, num_classes, alpha, gamma):
  return cpu_library.call(
    'EffdetFocalLoss',
    (
      jax.ShapeDtypeStruct((), jnp.float32),
      jax.ShapeDtypeStruct(logits.shape, jnp.float32),
    ),
    logits,
    cls_ids.astype(jnp.int32),
    jnp.asarray(scale, jnp.float32).reshape(1),
    num_classes=np.int64(num_classes),
    alpha=np.float32(alpha),
    gamma=np.float32(gamma),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def focal_loss_sum(logits, cls_ids, scale, num_classes: int, alpha, gamma):
  """`effdet_jax.detection.focal.focal_loss_sum`, f32 logits: the sum
  times `scale`. The kernel writes the gradient already scaled, so where
  the cotangent is a constant 1 (the training loss) XLA drops the
  multiply that would be a pass over the logits' gradient."""
  return _loss_and_grad(logits, cls_ids, scale, num_classes, alpha, gamma)[0]


def _fwd(logits, cls_ids, scale, num_classes, alpha, gamma):
  loss, grad = _loss_and_grad(logits, cls_ids, scale, num_classes, alpha, gamma)
  return loss, (grad, cls_ids, loss, scale)


def _bwd(num_classes, alpha, gamma, res, g):
  del num_classes, alpha, gamma
  grad, cls_ids, loss, scale = res
  scale = jnp.asarray(scale, jnp.float32)
  # d(scale * sum)/d scale = the unscaled sum; zero scale, zero loss.
  d_scale = g * jnp.where(
    scale == 0, 0.0, loss / jnp.where(scale == 0, 1, scale)
  )
  # Class ids are integers: their cotangent is float0.
  return (
    g * grad,
    np.zeros(cls_ids.shape, jax.dtypes.float0),
    d_scale.astype(jnp.result_type(scale)),
  )


focal_loss_sum.defvjp(_fwd, _bwd)
