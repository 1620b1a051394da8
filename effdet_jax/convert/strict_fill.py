"""Strict filling of a variable tree from named source tensors.

A converter is a function from our variable path to a source name plus a
layout transform. Every target must be filled, every source tensor used
(except names matched by `ignore`); any gap is one error listing the names.
Intended gaps are explicit: targets whose source name matches
`allow_missing` may be absent (or of another shape) and are then taken from
`fallback` (fresh variables), and source tensors matching it may stay
unused. `fill_report` also returns what was matched, for the report.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]
# (source name, transform applied to the source array)
Rule = tuple[str, Callable[[np.ndarray], np.ndarray]]
NamePredicate = str | Callable[[str, set[str]], bool] | None


class ConversionError(ValueError):
  """The source does not match the target model."""


@dataclasses.dataclass
class Report:
  """What a fill did: (our path, source name, shape) per matched target."""

  matched: list[tuple[str, str, tuple[int, ...]]]
  # (our path, source name, why) of allowed gaps: why = 'missing' or
  # 'shape (source) vs (target)'; values from `fallback` where given. A
  # backbone-only source (torch-backbone) adds the rest as 'not backbone'.
  fresh: list[tuple[str, str, str]]
  skipped: list[str]  # source names left unused on purpose

  def lines(self) -> list[str]:
    out = [f'matched {len(self.matched)} variables:']
    out += [f'  {p} <- {n} {list(s)}' for p, n, s in sorted(self.matched)]
    out.append(f'initialised fresh: {len(self.fresh)}')
    out += [f'  {p} ({n}: {why})' for p, n, why in sorted(self.fresh)]
    out.append(f'source tensors not used (allowed): {len(self.skipped)}')
    out += [f'  {n}' for n in sorted(self.skipped)]
    return out


def preview(names: Iterable[str], limit: int = 12) -> str:
  """`a, b, c ... (+n more)`: the first names of a sorted list."""
  names = sorted(names)
  more = f' ... (+{len(names) - limit} more)' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def _predicate(spec: NamePredicate) -> Callable[[str, set[str]], bool]:
  if spec is None or spec == '':
    return lambda n, used: False
  if isinstance(spec, str):
    rx = re.compile(spec)
    return lambda n, used: rx.fullmatch(n) is not None
  return spec


def fill_report(
  abstract: Mapping,
  rule: Callable[[Path], Rule],
  read: Callable[[str], np.ndarray],
  source_names: Iterable[str],
  ignore: NamePredicate = None,
  allow_missing: str = '',
  fallback: Mapping | None = None,
) -> tuple[dict, Report]:
  """Builds a variable tree shaped like `abstract` from source tensors.

  Args:
    abstract: our variables ({'params', 'batch_stats'}) or their shapes.
    rule: our flattened path (collection first) -> (source name, transform).
    read: source name -> array.
    source_names: all names the source holds.
    ignore: source names that may stay unused silently (not weights): a
      regex (re.fullmatch), or a predicate of (name, names used).
    allow_missing: regex (re.match, anchored at the start like the official
      `var_freeze_expr`) of intended gaps: a target whose source name
      matches may be missing or of another shape, a source tensor whose name
      matches may stay unused.
    fallback: values for the allowed-missing targets (e.g. fresh variables);
      without it such targets are left out of the result.

  Raises:
    ConversionError: listing missing sources, shape mismatches and unused
      source tensors that `allow_missing` does not cover.
  """
  flat = traverse_util.flatten_dict(dict(abstract))
  fallback_flat = traverse_util.flatten_dict(dict(fallback or {}))
  source_names = set(source_names)
  gap = re.compile(allow_missing) if allow_missing else None
  allowed = lambda n: gap is not None and gap.match(n) is not None
  out, used, missing, bad_shape = {}, set(), [], []
  report = Report([], [], [])

  def take_fallback(path, name, why):
    if not allowed(name):
      return False
    report.fresh.append(('/'.join(path), name, why))
    if path in fallback_flat:
      out[path] = np.asarray(fallback_flat[path])
    return True

  for path, leaf in flat.items():
    name, transform = rule(path)
    if name not in source_names:
      if not take_fallback(path, name, 'missing'):
        missing.append(f'{name} (for {"/".join(path)})')
      continue
    value = np.asarray(transform(np.asarray(read(name))))
    if tuple(value.shape) != tuple(leaf.shape):
      why = f'shape {tuple(value.shape)} vs {tuple(leaf.shape)}'
      if not take_fallback(path, name, why):
        used.add(name)
        bad_shape.append(
          f'{name}: source {tuple(value.shape)} vs target'
          f' {tuple(leaf.shape)} at {"/".join(path)}'
        )
      continue
    used.add(name)
    out[path] = value.astype(np.float32)
    report.matched.append(('/'.join(path), name, tuple(value.shape)))
  silent = _predicate(ignore)
  unused = set()
  for n in source_names - used:
    if silent(n, used):
      continue
    if allowed(n):
      report.skipped.append(n)
    else:
      unused.add(n)
  errors = []
  if bad_shape:
    errors.append(f'{len(bad_shape)} shape mismatches: {preview(bad_shape)}')
  if missing:
    errors.append(
      f'{len(missing)} targets without a source: {preview(missing)}'
    )
  if unused:
    errors.append(f'{len(unused)} unused source tensors: {preview(unused)}')
  if errors:
    raise ConversionError(
      'the source does not match the model: '
      + '; '.join(errors)
      + ' (intended gaps: --allow-missing=REGEX)'
    )
  tree = jax.tree.map(np.asarray, traverse_util.unflatten_dict(out))
  return tree, report


def fill(
  abstract: Mapping,
  rule: Callable[[Path], Rule],
  read: Callable[[str], np.ndarray],
  source_names: Iterable[str],
  ignore: NamePredicate = None,
) -> dict:
  """`fill_report` without gaps or report: every target, every tensor."""
  return fill_report(abstract, rule, read, source_names, ignore)[0]
