"""A 1x1 conv + inference BN + activation as one XLA:CPU custom call.

`pointwise_cpu.cc`: `act((x @ w) * scale + shift)` for few input channels
(EfficientNet's expand layers at high resolution), one pass that writes
the output once, where XLA:CPU runs a slow small-K dot and then a second
elementwise pass. Inference only: the VJP goes through the jnp form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from effdet_jax.kernels import cpu_library

MAX_IN = 64  # pointwise_cpu.cc kMaxIn


def supports(dtype, in_channels: int, out_channels: int, act) -> bool:
  """f32, K <= 64, N a multiple of 16, a known activation, kernels on."""
  return (
    jnp.dtype(dtype) == jnp.float32
    and in_channels <= MAX_IN
    and out_channels % 16 == 0
    and cpu_library.act_code(act) is not None
    and cpu_library.enabled()
  )


def _unfused(x, w, scale, shift, act):
  z = jnp.einsum('...c,cd->...d', x, w) * scale + shift
  return z if act is None else act(z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def pointwise_affine_act(x, w, scale, shift, act):
  """`act((x @ w) * scale + shift)` over x's last axis, f32, one pass."""
  rows = int(np.prod(x.shape[:-1]))
  y = cpu_library.call(
    'EffdetPointwiseAffineAct',
    jax.ShapeDtypeStruct((rows, w.shape[1]), jnp.float32),
    x.reshape(rows, x.shape[-1]),
    w,
    scale.astype(jnp.float32),
    shift.astype(jnp.float32),
    act=np.int64(cpu_library.act_code(act)),
  )
  return y.reshape(*x.shape[:-1], w.shape[1])


def _fwd(x, w, scale, shift, act):
  return pointwise_affine_act(x, w, scale, shift, act), (x, w, scale, shift)


def _bwd(act, res, dy):
  return jax.vjp(lambda *a: _unfused(*a, act), *res)[1](dy)


pointwise_affine_act.defvjp(_fwd, _bwd)
