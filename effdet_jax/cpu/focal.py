"""Summed sigmoid focal loss over one level, fused for speed.

Same function as `losses.focal_loss` summed (official
`efficientdet/det_model_fn.py: focal_loss`) for 0/1 labels, written so
that the forward and the gradient are each ONE elementwise pass over
`[B, H, W, A*C]`:

With z = x for a negative label and z = -x for a positive one,

  CE = softplus(z),  1 - p_t = sigmoid(z) = exp(z - softplus(z)),
  loss = alpha_t * exp(gamma * (z - softplus(z))) * softplus(z),
  dloss/dz = alpha_t * m * (gamma * (1 - s) * softplus(z) + s),

with m = sigmoid(z)**gamma and s = sigmoid(z). Autodiff of the textbook
form instead stores and re-reads half a dozen full-size intermediates (the
focal loss of D0 at 512 is 4.4M elements per image; profiling the train step
on XLA:CPU put ~40 % of its time there). Labels are built in the fusion
from class ids (no one-hot tensor), and levels are not concatenated (the
gradient of a concatenation is a copy per level). XLA:CPU (jaxlib 0.10)
still splits each pass into four or five fusions, one full-size array
each, because it does not fuse an exp or log that has several users: in
f32 on one device the C++ kernel (`native_focal`) computes both passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from effdet_jax.cpu import native_focal

Array = jax.Array


def _terms(logits, cls_ids, num_classes, alpha, gamma):
  """Per element: (alpha_t, z-sign, softplus(z), sigmoid(z)**gamma, s)."""
  b, h, w, ac = logits.shape
  x = logits.astype(jnp.float32).reshape(b, h, w, ac // num_classes, -1)
  ids = cls_ids.reshape(b, h, w, ac // num_classes, 1)
  positive = ids == jnp.arange(num_classes, dtype=ids.dtype)
  sign = jnp.where(positive, -1.0, 1.0)
  z = sign * x
  sp = jnp.maximum(z, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(z)))
  log_s = z - sp
  mod = jnp.exp(gamma * log_s)
  alpha_t = jnp.where(positive, alpha, 1.0 - alpha)
  return alpha_t, sign, sp, mod, log_s


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
      value outside `[0, num_classes)` for background.
    num_classes, alpha, gamma: the loss constants.
    scale: a float32 scalar (the loss normaliser's inverse): the CPU kernel
      applies it as it writes the gradient, one pass over it fewer than
      scaling the sum afterwards.

  Returns:
    A float32 scalar.
  """
  if native_focal.supports(logits.dtype):
    return native_focal.focal_loss_sum(
      logits, cls_ids, scale, num_classes, alpha, gamma
    )
  return scale * focal_loss_sum_jnp(logits, cls_ids, num_classes, alpha, gamma)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def focal_loss_sum_jnp(logits, cls_ids, num_classes, alpha, gamma):
  """`focal_loss_sum` in jnp (any backend, any dtype)."""
  alpha_t, _, sp, mod, _ = _terms(logits, cls_ids, num_classes, alpha, gamma)
  return jnp.sum(alpha_t * mod * sp)


def _fwd(logits, cls_ids, num_classes, alpha, gamma):
  alpha_t, _, sp, mod, _ = _terms(logits, cls_ids, num_classes, alpha, gamma)
  return jnp.sum(alpha_t * mod * sp), (logits, cls_ids)


def _bwd(num_classes, alpha, gamma, res, g):
  logits, cls_ids = res
  alpha_t, sign, sp, mod, log_s = _terms(
    logits, cls_ids, num_classes, alpha, gamma
  )
  s = jnp.exp(log_s)
  dz = alpha_t * mod * (gamma * (1.0 - s) * sp + s)
  dx = (g * sign * dz).reshape(logits.shape).astype(logits.dtype)
  # Class ids are integers: their cotangent is float0.
  zero = jnp.zeros(cls_ids.shape, jax.dtypes.float0)
  return dx, zero


focal_loss_sum_jnp.defvjp(_fwd, _bwd)
