"""A BiFPN node's fast normalized fusion + activation as XLA:CPU custom calls.

`act(sum_i relu(v_i) x_i / (sum_j relu(v_j) + 1e-4))` over the node's
resampled inputs (the official `fastattn` / `channel_fastattn` methods,
then the op-after-combine's activation). `fusion_cpu.cc` reads the inputs
once forward and once backward, where XLA:CPU ran the jnp form as several
passes and one full-tensor reduction per input for the weights' gradients
(D0 b8: ~45 ms of the train step). Same function as the jnp form
(tests/test_native_kernels.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effdet_jax.cpu import library as cpu_library

EPSILON = 0.0001  # the official fast-attention denominator's epsilon
MAX_INPUTS = 8  # fusion_cpu.cc kMaxInputs


def supports(dtype, num_inputs: int, act: Callable | None) -> bool:
  """f32, 1 to 8 inputs, an activation the kernels know, kernels on."""
  return (
    jnp.dtype(dtype) == jnp.float32
    and 1 <= num_inputs <= MAX_INPUTS
    and cpu_library.act_code(act) is not None
    and cpu_library.enabled()
  )


def _normalized(weights: jax.Array, channels: int):
  """relu'd weights `[n, C]` and their total `[C]` (+ epsilon), summed in
  order as the jnp form; scalar weights broadcast over the channels."""
  r = [jax.nn.relu(w) for w in weights]
  total = r[0]
  for w in r[1:]:
    total = total + w
  total = total + EPSILON
  shape = (channels,)
  return (
    jnp.stack([jnp.broadcast_to(w, shape) for w in r]).astype(jnp.float32),
    jnp.broadcast_to(total, shape).astype(jnp.float32),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fast_fusion_act(
  xs: Sequence[jax.Array], weights: jax.Array, act: Callable | None
) -> jax.Array:
  """`act(sum_i x_i * relu(w_i) / (sum_j relu(w_j) + 1e-4))`.

  xs: n maps of one shape `[..., C]`, f32. weights: `[n]` (one scalar per
  input, `fastattn`) or `[n, C]` (`channel_fastattn`).
  """
  w, total = _normalized(weights, xs[0].shape[-1])
  return cpu_library.call(
    'EffdetFusionAct',
    jax.ShapeDtypeStruct(xs[0].shape, jnp.float32),
    w,
    total,
    *xs,
    act=np.int64(cpu_library.act_code(act)),
  )


def _fwd(xs, weights, act):
  return fast_fusion_act(xs, weights, act), (xs, weights)


def _bwd(act, res, g):
  xs, weights = res
  n, c = len(xs), xs[0].shape[-1]
  w, total = _normalized(weights, c)
  sums, *dxs = cpu_library.call(
    'EffdetFusionActBackward',
    (
      jax.ShapeDtypeStruct((n, c), jnp.float32),
      *[jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in xs],
    ),
    g,
    w,
    total,
    *xs,
    act=np.int64(cpu_library.act_code(act)),
  )
  # out = sum_i x_i r_i / t, t = sum_j r_j + eps, per channel: d out / d r_k
  # = (x_k - s) / t, s the fused sum; sums = the kernel's sums over rows of
  # ga * (x_k - s).
  if weights.ndim == 1:
    dr = jnp.sum(sums, axis=1) / total[0]
  else:
    dr = sums / total
  dweights = jnp.where(weights > 0, dr, 0.0).astype(weights.dtype)
  return type(xs)(dxs), dweights


fast_fusion_act.defvjp(_fwd, _bwd)
