"""effdet_jax: EfficientDet (D0-D7x, lite0-lite4) in JAX/Flax."""

from effdet_jax.api import build_model, create_model, load, model_config, save
from effdet_jax.registry import model_names

__all__ = [
  'build_model',
  'create_model',
  'load',
  'model_config',
  'model_names',
  'save',
]
