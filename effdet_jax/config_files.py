"""Run config files (`configs/*.py`), loaded by path, never imported.

The config files live in the repository's top-level `configs/` folder and
are not an installed package (a top-level `configs` package would collide
with other projects'). `python -m effdet_jax.main --config=configs/d0.py`
loads them by path (ml_collections `config_flags`); code that needs a
config does the same through this module:

  config = config_files.load('demo:test')  # get_config('test')
  base = config_files.load_module('base', near=__file__)  # in a config file
  args = config_files.parse_arg(arg, ('test',), __file__)  # in get_config

A name ('d0', 'd0.py') is looked up beside `near` (the calling config
file), then in `DEFAULT_CONFIG_DIR`; any existing path is taken as it is,
so the tools' default `configs/d0.py` works from any working directory.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import types
from collections.abc import Sequence
from typing import Any

# The repository's configs/ (beside the effdet_jax package of a source
# checkout or an editable install); ./configs where that does not exist.
_REPO_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
DEFAULT_CONFIG_DIR = (
  _REPO_CONFIGS if _REPO_CONFIGS.is_dir() else pathlib.Path('configs')
)

_modules: dict[pathlib.Path, types.ModuleType] = {}


def find(
  path_or_name: str | os.PathLike, near: str | os.PathLike | None = None
) -> pathlib.Path:
  """The config file a path or a name means.

  An existing path is returned as it is. Otherwise the file name (`.py`
  added when missing) is looked up in `near`'s folder (a file or a
  folder), then in DEFAULT_CONFIG_DIR: 'd0', 'd0.py' and 'configs/d0.py'
  all find the repository's d0 config from any working directory.
  """
  path = pathlib.Path(path_or_name)
  if path.is_file():
    return path
  name = path.name if path.suffix == '.py' else path.name + '.py'
  folders = []
  if near is not None:
    near = pathlib.Path(near)
    folders.append(near if near.is_dir() else near.parent)
  folders.append(DEFAULT_CONFIG_DIR)
  for folder in folders:
    if (folder / name).is_file():
      return folder / name
  raise FileNotFoundError(
    f'config {str(path_or_name)!r} not found (looked in '
    f'{", ".join(str(f) for f in folders)})'
  )


def load_module(
  path_or_name: str | os.PathLike, near: str | os.PathLike | None = None
) -> types.ModuleType:
  """The config file as a module (executed once per file and process)."""
  path = find(path_or_name, near).resolve()
  if path not in _modules:
    spec = importlib.util.spec_from_file_location(
      f'effdet_jax_config_{path.stem}', path
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _modules[path] = module
  return _modules[path]


def load(spec: str | os.PathLike, near: str | os.PathLike | None = None) -> Any:
  """`get_config(arg)` of a config file; `spec` is 'PATH_OR_NAME[:ARG]',
  as on the command line (`--config=configs/demo.py:test`)."""
  text = os.fspath(spec)
  arg = None
  if ':' in text and not pathlib.Path(text).exists():
    text, arg = text.rsplit(':', 1)
  module = load_module(text, near)
  return module.get_config() if arg is None else module.get_config(arg)


def parse_arg(
  arg: str | None,
  accepted: Sequence[str] = (),
  config: str | os.PathLike | None = None,
) -> set[str]:
  """The comma-separated words of a config's argument (`FILE:ARG`).

  For `get_config(arg)` of a config file (`config`, its `__file__`, names
  it in the message). Raises ValueError for a word not in `accepted` (no
  word is accepted by default), listing the accepted ones: a typo
  (`demo.py:tset`) would otherwise silently run the full config.
  """
  words = {w.strip() for w in (arg or '').split(',')} - {''}
  unknown = sorted(words - set(accepted))
  if unknown:
    where = f'config {pathlib.Path(config).name}' if config else 'the config'
    takes = 'takes no argument'
    if len(accepted) == 1:
      takes = f'accepts {accepted[0]!r} or no argument'
    elif accepted:
      takes = (
        f'accepts {", ".join(repr(a) for a in accepted)} (any of them, '
        'comma-separated) or no argument'
      )
    raise ValueError(
      f'unknown argument {", ".join(repr(w) for w in unknown)}: {where} '
      f'{takes} (--config=FILE:ARG)'
    )
  return words
