"""Multiply-adds of a network, counted the way the official code counts.

The official `utils.num_params_flops` reports TF profiler float operations
// 2. The profiler only counts ops with a registered "flops" statistic
(`tensorflow/python/profiler/internal/flops_registry.py`, `nn_ops.py`):
Conv2D (2 per MAC), DepthwiseConv2dNative (2 per MAC), BiasAdd, MatMul, and
element-wise Add/Sub/Mul/RealDiv/AddN (1 per output element), Mean/Sum (1 per
input element), MaxPool (window area per output element). Fused BatchNorm,
Sigmoid, Relu/Relu6, Pad and resizes count zero.

We walk the jaxpr of the inference forward pass (traced with abstract shapes,
nothing is compiled) and apply the same rules per primitive; equations inside
BatchNorm modules count zero (the official inference graph uses the fused
BN op). The walk traces the plain forms (the 'xla' backend of
`effdet_jax.ops`): a backend's custom calls would hide their arithmetic.
`tf.nn.swish(x)` is `x * sigmoid(beta * x)`: two Mul ops, so a swish counts
2 per element where our `x * sigmoid(x)` has one multiply.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from effdet_jax import ops

_ELEMENTWISE = {'add', 'sub', 'mul', 'div', 'add_any'}
_FREE = {'max', 'min', 'logistic', 'rsqrt', 'exp', 'tanh', 'clamp'}


def _size(aval) -> int:
  return int(np.prod(aval.shape)) if hasattr(aval, 'shape') else 1


def _sub_jaxprs(eqn) -> Iterable[Any]:
  for p in eqn.params.values():
    for q in p if isinstance(p, (tuple, list)) else (p,):
      if hasattr(q, 'eqns'):
        yield q
      elif hasattr(q, 'jaxpr') and hasattr(q.jaxpr, 'eqns'):
        yield q.jaxpr


def _eqn_flops(eqn) -> int:
  prim = eqn.primitive.name
  out = eqn.outvars[0].aval if eqn.outvars else None
  if prim == 'conv_general_dilated':
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params['dimension_numbers']
    spec = dn.rhs_spec  # (out, in, *spatial) indices
    k = int(np.prod([rhs[i] for i in spec[2:]])) * rhs[spec[1]]
    return 2 * _size(out) * k
  if prim == 'dot_general':
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    lhs = eqn.invars[0].aval.shape
    k = int(np.prod([lhs[i] for i in lhs_contract]))
    return 2 * _size(out) * k
  if prim in _ELEMENTWISE:
    return _size(out)
  if prim in ('reduce_sum', 'reduce_max'):
    return _size(eqn.invars[0].aval)
  if prim == 'reduce_window_max':
    return _size(out) * int(np.prod(eqn.params['window_dimensions']))
  return 0


def count_flops(
  fn, *args, skip_scopes: Iterable[str] = (), swish_muls: int = 2
) -> int:
  """Multiply-adds (TF profiler float ops // 2) of `fn(*args)`.

  Args:
    fn: a JAX function; args may be `jax.ShapeDtypeStruct`s.
    skip_scopes: module paths whose equations count 0 (called from their
      parent, or from a module of the parent, `parent/conv/name`).
    swish_muls: multiplies per element the reference counts for a swish.
  """
  skip = set(skip_scopes)
  # A module called from inside another's call runs under the caller's
  # name stack, `P/conv/bn` for the module `P/bn`: a scope matches that
  # way too.
  by_name: dict[str, list[str]] = {}
  for scope in skip:
    prefix, _, name = scope.rpartition('/')
    by_name.setdefault(name, []).append(prefix + '/')

  def _in_skipped_scope(stack: str) -> bool:
    if stack in skip:
      return True
    name = stack.rpartition('/')[2]
    return any(stack.startswith(p) for p in by_name.get(name, ()))

  # Traced with the plain forms (this clears JAX's caches: see
  # `ops.use_backend`).
  with ops.use_backend('xla'):
    jaxpr = jax.make_jaxpr(fn)(*args)
  total = 0

  def walk(jx):
    nonlocal total
    for eqn in jx.eqns:
      subs = list(_sub_jaxprs(eqn))
      if subs:
        for s in subs:
          walk(s)
        continue
      if _in_skipped_scope(str(eqn.source_info.name_stack)):
        continue
      flops = _eqn_flops(eqn)
      if eqn.primitive.name == 'mul' and swish_muls != 1 and _is_swish(eqn):
        flops *= swish_muls
      total += flops

  producers = {}

  def index(jx):
    for eqn in jx.eqns:
      for v in eqn.outvars:
        producers[id(v)] = eqn
      for s in _sub_jaxprs(eqn):
        index(s)

  def _is_swish(eqn) -> bool:
    a, b = eqn.invars
    pb = producers.get(id(b))
    return (
      pb is not None and pb.primitive.name == 'logistic' and pb.invars[0] is a
    )

  index(jaxpr.jaxpr)
  walk(jaxpr.jaxpr)
  return total // 2
