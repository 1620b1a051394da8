"""Helpers for tests and tools: a small run config with a data section."""

from __future__ import annotations

from typing import Any

import ml_collections

from effdet_jax.data.config import data_config


def small_config(
  image_size: tuple[int, int] | None = (128, 128),
  batch_size: int = 2,
  model: str = 'efficientdet-d0',
  **data: Any,
) -> ml_collections.ConfigDict:
  """A run config with `config.data = data_config()` and overrides."""
  from effdet_jax import config_files  # noqa: PLC0415

  base = config_files.load_module('base')

  config = base.get_config(model)
  config.data = data_config()
  if image_size is not None:  # None: the model's own size
    config.model.image_size = tuple(image_size)
  config.train.batch_size = batch_size
  config.eval.batch_size = batch_size
  for key, value in data.items():
    config.data[key] = value
  return config
