"""Switches on JAX's persistent compilation cache from a run config.

`config.compilation_cache.dir` ('' = off) may be a local path or a gs://
bucket; compiled XLA programs taking at least `min_compile_time_s` to
compile are stored there and reused by the next process with the same
program, JAX version and devices (a resumed run, an eval job, a benchmark).
"""

from __future__ import annotations

import logging
from typing import Any

import jax


def enable(config: Any) -> bool:
  """Points JAX's compilation cache at the configured folder; True if on."""
  section = config.get('compilation_cache')
  if not section or not section.dir:
    return False
  jax.config.update('jax_compilation_cache_dir', str(section.dir))
  jax.config.update(
    'jax_persistent_cache_min_compile_time_secs',
    float(section.min_compile_time_s),
  )
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  logging.info('persistent compilation cache: %s', section.dir)
  return True
