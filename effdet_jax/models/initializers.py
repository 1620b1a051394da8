"""The model's initialisers, each with a JAX form and an equal NumPy form.

Every variable of the model is created by one of these. The JAX form is what
Flax calls inside `model.init`; the NumPy form draws the same distribution on
the host, so a fresh state needs no compiled program (see
`effdet_jax/initialization.py`): on a CPU the compiled initialisation of a
D0 (~700 random leaves, each its own fused loop) takes longer to compile
than the training step it precedes.

Fans follow `jax.nn.initializers.variance_scaling` with its default axes
(in = -2, out = -1, receptive field = the leading axes), which is also how
Keras computes them for the official HWIO convolution weights.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import linen as nn

# While set, every initialiser call appends (value, initialiser) to the list:
# `effdet_jax.initialization` matches the values to the variables' paths.
_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar(
  'effdet_jax_init_recording', default=None
)

# The std of a unit normal truncated at ±2 (jax.nn.initializers and Keras
# divide by it so the truncated draw keeps the asked-for variance).
_TRUNCATED_STD = 0.87962566103423978


class Initializer:
  """A Flax initialiser `(key, shape, dtype) -> Array` with a NumPy form."""

  def __call__(self, key: Any, shape: tuple, dtype: Any = np.float32) -> Any:
    value = self.jax(key, tuple(shape), dtype)
    records = _RECORDING.get()
    if records is not None:
      records.append((value, self))
    return value

  def jax(self, key: Any, shape: tuple, dtype: Any) -> jax.Array:
    raise NotImplementedError

  def numpy(
    self, rng: np.random.Generator, shape: tuple, dtype: Any
  ) -> np.ndarray:
    raise NotImplementedError


def recording() -> _Recorder:
  """A context in which initialiser calls are recorded (for host init)."""
  return _Recorder()


class _Recorder:
  def __enter__(self) -> list:
    self.records: list = []
    self._token = _RECORDING.set(self.records)
    return self.records

  def __exit__(self, *exc: Any) -> None:
    _RECORDING.reset(self._token)


@dataclasses.dataclass(frozen=True)
class Constant(Initializer):
  """Every element `value` (ones, zeros, the class-bias prior)."""

  value: float

  def jax(self, key, shape, dtype):
    return nn.initializers.constant(self.value, dtype)(key, shape, dtype)

  def numpy(self, rng, shape, dtype):
    return np.full(shape, self.value, dtype)


@dataclasses.dataclass(frozen=True)
class Normal(Initializer):
  """N(0, stddev²)."""

  stddev: float

  def jax(self, key, shape, dtype):
    return nn.initializers.normal(self.stddev, dtype)(key, shape, dtype)

  def numpy(self, rng, shape, dtype):
    return (rng.standard_normal(shape) * self.stddev).astype(dtype)


def fans(shape: tuple) -> tuple[float, float]:
  """(fan_in, fan_out) as jax.nn.initializers.variance_scaling computes."""
  receptive = math.prod(shape[:-2])
  return shape[-2] * receptive, shape[-1] * receptive


@dataclasses.dataclass(frozen=True)
class VarianceScaling(Initializer):
  """Variance `scale / fan` with a normal, truncated-normal or uniform draw."""

  scale: float
  mode: str  # fan_in | fan_out | fan_avg
  distribution: str  # normal | truncated_normal | uniform

  def jax(self, key, shape, dtype):
    init = nn.initializers.variance_scaling(
      self.scale, self.mode, self.distribution, dtype=dtype
    )
    return init(key, shape, dtype)

  def variance(self, shape: tuple) -> float:
    fan_in, fan_out = fans(shape)
    fan = {
      'fan_in': fan_in,
      'fan_out': fan_out,
      'fan_avg': (fan_in + fan_out) / 2,
    }[self.mode]
    return self.scale / fan

  def numpy(self, rng, shape, dtype):
    variance = self.variance(shape)
    if self.distribution == 'normal':
      x = rng.standard_normal(shape) * math.sqrt(variance)
    elif self.distribution == 'truncated_normal':
      x = _truncated_normal(rng, shape) * (math.sqrt(variance) / _TRUNCATED_STD)
    elif self.distribution == 'uniform':
      limit = math.sqrt(3 * variance)
      x = rng.uniform(-limit, limit, shape)
    else:
      raise ValueError(f'unknown distribution {self.distribution!r}')
    return x.astype(dtype)


def _truncated_normal(rng: np.random.Generator, shape: tuple) -> np.ndarray:
  """A unit normal truncated to [-2, 2] (redraws the ~4.6 % outside)."""
  x = rng.standard_normal(shape)
  outside = np.abs(x) > 2
  while outside.any():
    x[outside] = rng.standard_normal(int(outside.sum()))
    outside = np.abs(x) > 2
  return x


zeros = Constant(0.0)
ones = Constant(1.0)
