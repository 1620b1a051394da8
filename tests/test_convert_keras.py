"""`--source=keras`: the official Keras `.h5` weights, read with h5py.

`shared/oracle/official-d0-256/model.h5` was written by the official Keras
model's `save_weights` after loading the EMA values of `tf1_ckpt/`, so its
conversion must equal the `--source=tf` (EMA) conversion bit for bit, and
our forward on `input.npy` must equal the official `outputs.npz`.
"""

import shutil
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest
from conftest import REPO
from flax import traverse_util

import effdet_jax
from effdet_jax.convert import ConversionError, convert, keras_h5

BB = 'efficientnet-b0'


@pytest.fixture(scope='module')
def d0_abstract():
  cfg = effdet_jax.model_config('efficientdet-d0')
  model = effdet_jax.build_model(cfg)
  return cfg, effdet_jax.api.abstract_variables(model)


@pytest.mark.slow
def test_keras_h5_equals_tf_ema_and_official_outputs(oracle_dir, tmp_path):
  out = tmp_path / 'd0_keras'
  subprocess.run(
    [
      sys.executable,
      '-m',
      'effdet_jax.convert',
      '--source=keras',
      f'--input={oracle_dir / "model.h5"}',
      '--config=configs/d0.py',
      f'--output={out}',
    ],
    check=True,
    cwd=REPO,
    capture_output=True,
  )
  report = (out / 'conversion_report.txt').read_text()
  assert 'matched 709 variables' in report
  assert 'efficientnet-b0/stem/conv2d/kernel [3, 3, 3, 32]' in report

  model, variables = effdet_jax.load(str(out))
  cfg = effdet_jax.model_config('efficientdet-d0')
  ref = convert('tf', str(oracle_dir / 'tf1_ckpt'), cfg, ema=True)
  ours = traverse_util.flatten_dict(jax.device_get(variables))
  theirs = traverse_util.flatten_dict(ref)
  assert ours.keys() == theirs.keys() and len(ours) == 709
  for path, value in theirs.items():
    np.testing.assert_array_equal(ours[path], value, err_msg='/'.join(path))

  x = np.load(oracle_dir / 'input.npy')
  cls, box = jax.jit(model.apply)(variables, x)
  official = np.load(oracle_dir / 'outputs.npz')
  for i, level in enumerate(range(3, 8)):
    for name, pred in (('cls', cls[i]), ('box', box[i])):
      want = official[f'{name}_l{level}']
      tol = 1e-4 * max(1.0, float(np.abs(want).max()))
      diff = float(np.abs(np.asarray(pred) - want).max())
      assert diff <= tol, f'{name}_l{level}: max|diff| {diff} > {tol}'


def _edited_h5(src, dst, rename):
  """A copy of an h5 with weight names renamed ({old: new}, no `:0`)."""
  shutil.copy(src, dst)
  with h5py.File(dst, 'r+') as f:
    for layer in f.attrs['layer_names']:
      group = f[layer]
      names = [
        n.decode() if isinstance(n, bytes) else n
        for n in group.attrs['weight_names']
      ]
      new = []
      for n in names:
        base = n[:-2]
        if base in rename:
          group.move(n, rename[base] + ':0')
          n = rename[base] + ':0'
        new.append(n)
      group.attrs['weight_names'] = np.array([n.encode() for n in new])


@pytest.mark.slow
def test_keras_h5_gaps_are_errors_listing_names(
  oracle_dir, tmp_path, d0_abstract
):
  cfg, abstract = d0_abstract
  bad = tmp_path / 'bad.h5'
  typo = 'box_net/box-predict/bias'
  _edited_h5(oracle_dir / 'model.h5', bad, {typo: 'box_net/box-predict/biass'})
  with pytest.raises(ConversionError) as err:
    keras_h5.convert_keras_h5(str(bad), abstract, BB)
  msg = str(err.value)
  assert '1 targets without a source: box_net/box-predict/bias ' in msg
  assert '1 unused source tensors: box_net/box-predict/biass' in msg

  # An intended gap: listed in the report, the rest still strict.
  variables, report = keras_h5.convert_keras_h5(
    str(bad),
    abstract,
    BB,
    allow_missing='box_net/box-predict/bias',
    with_report=True,
  )
  assert [f[0] for f in report.fresh] == ['params/box_net/box-predict/bias']
  assert report.skipped == ['box_net/box-predict/biass']
  assert len(report.matched) == 708
  assert 'bias' not in variables['params']['box_net']['box-predict']

  # Another number of classes: class-predict differs in shape; allowed as a
  # gap, it is fresh (from `fallback`), its source tensors skipped.
  cfg3 = effdet_jax.model_config('efficientdet-d0', num_classes=3)
  model3 = effdet_jax.build_model(cfg3)
  abstract3 = effdet_jax.api.abstract_variables(model3)
  with pytest.raises(ConversionError, match='2 shape mismatches'):
    keras_h5.convert_keras_h5(str(oracle_dir / 'model.h5'), abstract3, BB)
  gap = 'class_net/class-predict/(pointwise_kernel|bias)'
  _, report = keras_h5.convert_keras_h5(
    str(oracle_dir / 'model.h5'),
    abstract3,
    BB,
    allow_missing=gap,
    with_report=True,
  )
  assert sorted(f[2] for f in report.fresh) == [
    'shape (1, 1, 64, 810) vs (1, 1, 64, 27)',
    'shape (810,) vs (27,)',
  ]
  assert len(report.matched) == 707 and len(report.skipped) == 2

  # Not a weights file at all.
  with h5py.File(tmp_path / 'empty.h5', 'w'):
    pass
  with pytest.raises(ConversionError, match='not a Keras weights file'):
    keras_h5.read_h5_weights(str(tmp_path / 'empty.h5'))
