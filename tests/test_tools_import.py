"""Every program with absl flags imports into one process (a notebook, a
test): flags are defined by `_define_flags()`, called only when the module
runs as a program, never at import."""

import importlib
import pathlib

from absl import flags

import effdet_jax

PACKAGE = pathlib.Path(effdet_jax.__file__).parent


def _programs_with_flags() -> list[str]:
  """Modules of the package whose source defines absl flags."""
  out = []
  for path in sorted(PACKAGE.rglob('*.py')):
    text = path.read_text()
    if 'flags.DEFINE_' in text:
      parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
      out.append('.'.join(parts))
  return out


def test_all_programs_import_into_one_process():
  names = _programs_with_flags()
  # The entry point, the converter, the records writer and the tools.
  for expected in (
    'effdet_jax.main',
    'effdet_jax.convert.__main__',
    'effdet_jax.data.create_tfrecord',
    'effdet_jax.tools.benchmark',
    'effdet_jax.tools.export',
    'effdet_jax.tools.infer',
    'effdet_jax.tools.plan_memory',
    'effdet_jax.tools.summary',
  ):
    assert expected in names
  modules = [importlib.import_module(name) for name in names]
  # Importing defined none of their flags ('config', 'output', ...).
  assert not {'config', 'workdir', 'output', 'checkpoint'} & set(flags.FLAGS)
  assert not set(names) & set(flags.FLAGS.flags_by_module_dict())
  for module in modules:
    assert callable(getattr(module, '_define_flags', None)), module.__name__
    assert callable(getattr(module, 'main', None)), module.__name__
