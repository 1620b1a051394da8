"""effdet_jax: EfficientDet (D0-D7x, lite0-lite4) in JAX/Flax."""

# create_model / load return `(model, variables)` pairs that also carry the
# model config, which `predict` needs (image size, normalisation, anchors).
from effdet_jax.api import build_model, create_model, load, model_config, save
from effdet_jax.inference import draw, predict
from effdet_jax.registry import model_names

__all__ = [
  'build_model',
  'create_model',
  'draw',
  'load',
  'model_config',
  'model_names',
  'predict',
  'save',
]
