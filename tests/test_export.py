"""`python -m effdet_jax.tools.export`: the SavedModel, run by TensorFlow
alone, gives the detections of `effdet_jax.predict`."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO, shared_path
from PIL import Image

import effdet_jax
from effdet_jax.tools import export

MAX_BOXES = 20

# Runs in a fresh interpreter where jax, flax and effdet_jax cannot be
# imported, so the SavedModel is shown to need TensorFlow only.
_TF_ONLY = textwrap.dedent(
  """
  import sys

  class Block:
    def find_spec(self, name, path=None, target=None):
      if name.split('.')[0] in ('jax', 'jaxlib', 'flax', 'effdet_jax'):
        raise ImportError(f'{name} is blocked')

  sys.meta_path.insert(0, Block())
  import numpy as np
  import tensorflow as tf

  saved_model, inputs, output = sys.argv[1:]
  serve = tf.saved_model.load(saved_model).signatures['serving_default']
  images = np.load(inputs)
  results = {}
  for key in images.files:
    # Each image twice: a batch of 2 through the symbolic batch dimension
    # (one XLA compile serves both images).
    out = serve(images=tf.constant(np.stack([images[key]] * 2)))
    for name, value in out.items():
      results[f'{key}/{name}'] = value.numpy()
  np.savez(output, **results)
  """
)


def _env():
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
    [str(REPO), str(REPO / 'tests'), env.get('PYTHONPATH', '')]
  )
  # One fake device is enough here and keeps the subprocesses lean.
  env.pop('XLA_FLAGS', None)
  return env


@pytest.fixture(scope='module')
def photos():
  folder = shared_path('data', 'coco128', 'images')
  images, sizes = [], set()
  for path in sorted(folder.iterdir()):
    array = np.asarray(Image.open(path).convert('RGB'))
    if array.shape[:2] not in sizes:
      sizes.add(array.shape[:2])
      images.append(array)
    if len(images) == 2:
      return images
  pytest.skip('need two images of different sizes')


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """(tiny model, SavedModel dir) exported through the real CLI."""
  tmp = tmp_path_factory.mktemp('export')
  tiny = effdet_jax.create_model(
    'efficientdet-d0',
    num_classes=3,
    image_size=(128, 128),
    fpn_num_filters=16,
    fpn_cell_repeats=1,
    box_class_repeats=1,
  )
  effdet_jax.save(str(tmp / 'ckpt'), tiny.config, tiny[1])
  out = tmp / 'saved_model'
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'effdet_jax.tools.export',
      f'--checkpoint={tmp / "ckpt"}',
      f'--output={out}',
      f'--max_boxes={MAX_BOXES}',
    ],
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
    'saved_model': str(out)
  }
  return tiny, out


@pytest.mark.slow
def test_saved_model_has_no_cpu_kernel_custom_calls(exported):
  """The export traces with the 'xla' backend, whatever the process runs:
  a SavedModel cannot carry the XLA:CPU kernels (custom calls 'Effdet*'
  in the StableHLO that XlaCallModule holds)."""
  graph = (exported[1] / 'saved_model.pb').read_bytes()
  assert b'XlaCallModule' in graph
  assert b'Effdet' not in graph


@pytest.mark.slow
def test_saved_model_equals_predict(exported, photos, tmp_path):
  tiny, saved_model = exported
  inputs = tmp_path / 'images.npz'
  np.savez(inputs, **{f'img{i}': x for i, x in enumerate(photos)})
  results = tmp_path / 'results.npz'
  script = tmp_path / 'tf_only.py'
  script.write_text(_TF_ONLY)
  proc = subprocess.run(
    [sys.executable, str(script), str(saved_model), str(inputs), str(results)],
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = dict(np.load(results))

  want = effdet_jax.predict(tiny, photos, min_score=0.0, max_boxes=MAX_BOXES)
  for i, (image, det) in enumerate(zip(photos, want, strict=True)):
    out = {name: got[f'img{i}/{name}'] for name in export.OUTPUT_KEYS}
    assert out['boxes'].shape == (2, MAX_BOXES, 4)
    for name, value in out.items():
      np.testing.assert_allclose(value[1], value[0], atol=1e-5, err_msg=name)
    n = int(out['num_detections'][0])
    assert n == len(det.classes) > 0
    np.testing.assert_array_equal(out['classes'][0, :n], det.classes)
    np.testing.assert_allclose(out['boxes'][0, :n], det.boxes, atol=1e-3)
    np.testing.assert_allclose(out['scores'][0, :n], det.scores, atol=1e-5)
    # Unused slots are zeros; boxes are in this image's pixels.
    assert not out['classes'][0, n:].any()
    assert not out['boxes'][0, n:].any()
    h, w = image.shape[:2]
    assert out['boxes'][0, :n, 2].max() <= h
    assert out['boxes'][0, :n, 3].max() <= w


@pytest.mark.slow
def test_tflite_reports_why_it_cannot(exported, tmp_path):
  """TFLite either converts, or fails with a clear message (today: the
  converter cannot legalize this model's StableHLO)."""
  path = tmp_path / export.TFLITE_FILE
  try:
    export.export_tflite(str(exported[1]), str(path))
  except export.TFLiteUnsupportedError as err:
    assert 'Serve the SavedModel' in str(err)
    assert 'Converter said: ' in str(err)
    assert not path.exists()
  else:
    assert pathlib.Path(path).stat().st_size > 0
