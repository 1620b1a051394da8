"""Strict filling of a variable tree from named source tensors.

A converter is a function from our variable path to a source name plus a
layout transform. Every target must be filled, every source tensor used
(except names matched by `ignore`); any gap is one error listing the names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]
# (source name, transform applied to the source array)
Rule = tuple[str, Callable[[np.ndarray], np.ndarray]]


class ConversionError(ValueError):
  """The source does not match the target model."""


def _preview(names: Iterable[str], limit: int = 12) -> str:
  names = sorted(names)
  more = f' ... (+{len(names) - limit} more)' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def fill(
  abstract: Mapping,
  rule: Callable[[Path], Rule],
  read: Callable[[str], np.ndarray],
  source_names: Iterable[str],
  ignore: str | Callable[[str, set[str]], bool] | None = None,
) -> dict:
  """Builds a variable tree shaped like `abstract` from source tensors.

  Args:
    abstract: our variables ({'params', 'batch_stats'}) or their shapes.
    rule: our flattened path (collection first) -> (source name, transform).
    read: source name -> array.
    source_names: all names the source holds.
    ignore: source names that may stay unused: a regex (re.fullmatch), or
      a predicate of (name, names used).

  Raises:
    ConversionError: listing missing sources, shape mismatches and unused
      source tensors.
  """
  flat = traverse_util.flatten_dict(dict(abstract))
  source_names = set(source_names)
  out, used, missing, bad_shape = {}, set(), [], []
  for path, leaf in flat.items():
    name, transform = rule(path)
    if name not in source_names:
      missing.append(f'{name} (for {"/".join(path)})')
      continue
    used.add(name)
    value = np.asarray(transform(np.asarray(read(name))))
    if tuple(value.shape) != tuple(leaf.shape):
      bad_shape.append(
        f'{name}: source {tuple(value.shape)} vs target {tuple(leaf.shape)}'
        f' at {"/".join(path)}'
      )
      continue
    out[path] = value.astype(np.float32)
  if isinstance(ignore, str):
    pattern = ignore
    ignore = lambda n, _: re.fullmatch(pattern, n) is not None
  unused = {n for n in source_names - used if not (ignore and ignore(n, used))}
  errors = []
  if bad_shape:
    errors.append(f'{len(bad_shape)} shape mismatches: {_preview(bad_shape)}')
  if missing:
    errors.append(
      f'{len(missing)} targets without a source: {_preview(missing)}'
    )
  if unused:
    errors.append(f'{len(unused)} unused source tensors: {_preview(unused)}')
  if errors:
    raise ConversionError(
      'the source does not match the model: ' + '; '.join(errors)
    )
  return jax.tree.map(np.asarray, traverse_util.unflatten_dict(out))
