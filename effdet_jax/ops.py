"""The backend seam: named operations whose fast form depends on the backend.

The model (`effdet_jax/models/`) and the detection core
(`effdet_jax/detection/`) are written once, in plain Flax/lax/jnp: that is
what TPUs and GPUs run and what the parity tests prove against the official
outputs. A few of their functions and module methods are marked with
`@backend_form(name)`; the decorated code is the plain form. A backend may
hold a faster form of the same function under that name (the XLA:CPU
package `effdet_jax.cpu`: C++ kernels, fused conv + BN + activation, the
fused focal loss, the matcher), with the same variables and the same
outputs up to float rounding. Everything else always runs the plain code.

One switch per process chooses the backend:

* 'xla': the plain forms everywhere (TPU, GPU, and the CPU when asked);
* 'cpu': `effdet_jax.cpu`'s forms (XLA:CPU only);
* 'auto' (default): 'cpu' when JAX computes on the CPU, else 'xla'.

Set it with `set_backend` (`python -m effdet_jax.main --backend=...`), or
the environment variable `EFFDET_JAX_BACKEND`; it is resolved and logged
once, at the first use when nobody set it. The choice is made when a
function is traced; `use_backend` switches it inside a block (tests,
benchmarks) and clears JAX's caches on entry and exit for that reason.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

from absl import logging

BACKENDS = ('auto', 'xla', 'cpu')
ENV_VAR = 'EFFDET_JAX_BACKEND'

# The names a backend may give its own form of (`backend_form`).
FORMS = (
  # Operations.
  'conv2d',  # models/layers.py: conv2d
  'depthwise_conv2d',  # models/layers.py: depthwise_conv2d
  'max_pool2d',  # models/layers.py: max_pool2d
  'batch_norm_train',  # models/batch_norm.py: batch_norm_train
  'focal_loss_sum',  # detection/losses.py: focal_loss_sum
  'best_matches',  # detection/targets.py: best_matches
  # Blocks (a backend fuses their layers; same variables).
  'stem',  # models/efficientnet.py: Stem
  'mbconv_block',  # models/efficientnet.py: MBConvBlock
  'fnode',  # models/bifpn.py: FNode
  'head_net',  # models/heads.py: HeadNet
)

_resolved: str | None = None
_forms: dict[str, Callable[..., Any]] = {}
_plain: dict[str, Callable[..., Any]] = {}


def _resolve(name: str) -> str:
  if name not in BACKENDS:
    raise ValueError(f'unknown backend {name!r}; valid: {BACKENDS}')
  import jax  # noqa: PLC0415 - resolving starts JAX's backend

  platform = jax.default_backend()
  if name == 'auto':
    return 'cpu' if platform == 'cpu' else 'xla'
  if name == 'cpu' and platform != 'cpu':
    raise ValueError(
      f"backend 'cpu' needs JAX on the CPU; JAX computes on {platform!r}"
    )
  return name


def _activate(resolved: str) -> None:
  global _resolved, _forms
  forms: dict[str, Callable[..., Any]] = {}
  if resolved == 'cpu':
    from effdet_jax import cpu  # noqa: PLC0415 - only where it computes

    forms = cpu.forms()
  unknown = set(forms) - set(FORMS)
  if unknown:
    raise ValueError(f'backend {resolved!r} gives unknown forms {unknown}')
  _resolved, _forms = resolved, forms


def set_backend(name: str | None = None) -> str:
  """Chooses the backend of this process; returns 'xla' or 'cpu'.

  `name` None reads `$EFFDET_JAX_BACKEND` (default 'auto'). Logs the
  choice. Call it before the first function that uses the model is traced:
  jitted functions keep the forms they were traced with.
  """
  requested = name or os.environ.get(ENV_VAR) or 'auto'
  _activate(_resolve(requested))
  logging.info('effdet_jax backend: %s (%s requested)', _resolved, requested)
  if _resolved == 'cpu':
    from effdet_jax import cpu  # noqa: PLC0415

    logging.info('effdet_jax cpu backend: %s', cpu.describe())
  return _resolved


def backend() -> str:
  """The active backend ('xla' or 'cpu'); resolved on first use."""
  if _resolved is None:
    set_backend()
  return _resolved


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
  """Within the block the backend is `name` (restored after).

  Clears JAX's caches on entry and exit: a jitted function traced with one
  backend's forms is traced again with the other's.
  """
  import jax  # noqa: PLC0415

  before = backend()
  _activate(_resolve(name))
  jax.clear_caches()
  try:
    yield _resolved
  finally:
    _activate(before)
    jax.clear_caches()


def plain_forms() -> dict[str, Callable[..., Any]]:
  """The plain form of each named operation defined so far, by name."""
  return dict(_plain)


def backend_form(name: str) -> Callable[[Callable], Callable]:
  """Marks the decorated function (or module method) as the plain form of
  the named operation; the active backend may run its own form instead.

  A backend form is called as `form(plain, *args, **kwargs)`, with the
  arguments of the plain form (a module method's first one is the bound
  module), and may call `plain` itself for inputs it does not take.
  """
  if name not in FORMS:
    raise ValueError(f'{name!r} is not one of ops.FORMS')

  def decorate(plain: Callable) -> Callable:
    _plain[name] = plain

    @functools.wraps(plain)
    def call(*args, **kwargs):
      if _resolved is None:
        backend()
      form = _forms.get(name)
      if form is None:
        return plain(*args, **kwargs)
      return form(plain, *args, **kwargs)

    return call

  return decorate
