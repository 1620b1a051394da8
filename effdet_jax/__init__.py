"""effdet_jax: EfficientDet (D0-D7x, lite0-lite4) in JAX/Flax."""

from __future__ import annotations

import importlib

# create_model / load return `(model, variables)` pairs that also carry the
# model config, which `predict` needs (image size, normalisation, anchors).
# Loaded on first use (PEP 562): `python -m effdet_jax.main` imports this
# package before its own first line, and must be able to re-execute itself
# (cpu/malloc_tuning.py) before JAX and Flax are imported.
_EXPORTS = {
  'build_model': 'effdet_jax.api',
  'create_model': 'effdet_jax.api',
  'draw': 'effdet_jax.inference',
  'load': 'effdet_jax.api',
  'model_config': 'effdet_jax.api',
  'model_names': 'effdet_jax.registry',
  'predict': 'effdet_jax.inference',
  'save': 'effdet_jax.api',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  module = _EXPORTS.get(name)
  if module is None:
    # A submodule (`effdet_jax.api` after `import effdet_jax`), as when
    # this file imported them eagerly.
    try:
      return importlib.import_module(f'{__name__}.{name}')
    except ModuleNotFoundError as err:
      if err.name != f'{__name__}.{name}':
        raise
      raise AttributeError(
        f'module {__name__!r} has no attribute {name!r}'
      ) from None
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
