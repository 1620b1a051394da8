"""predict / draw and `python -m effdet_jax.tools.infer` with a tiny D0."""

import json

import jax
import numpy as np
import pytest
import tensorflow as tf
from conftest import shared_path
from PIL import Image

import effdet_jax
from effdet_jax import api, inference
from effdet_jax.data import preprocess
from effdet_jax.detection import anchors as anchors_lib
from effdet_jax.detection import postprocess
from effdet_jax.tools import infer


@pytest.fixture(scope='module')
def tiny():
  return effdet_jax.create_model(
    'efficientdet-d0',
    image_size=(128, 128),
    num_classes=3,
    fpn_num_filters=16,
    fpn_cell_repeats=1,
    box_class_repeats=1,
  )


@pytest.fixture(scope='module')
def photos():
  folder = shared_path('data', 'bccd', 'images')
  return sorted(folder.iterdir())[:3]


@pytest.mark.slow
def test_predict_equals_the_eval_path_by_hand(tiny, photos):
  """predict == eval preprocessing (data pipeline) + apply + global
  post-processing, boxes in original pixels."""
  model, variables = tiny
  cfg = tiny.config
  images = [np.asarray(Image.open(p).convert('RGB')) for p in photos[:2]]
  dets = effdet_jax.predict(
    (model, variables),
    images,
    config=cfg,
    min_score=0.0,
    max_boxes=20,
    batch_size=2,
  )
  params = preprocess.Params.from_config(
    type('C', (), {'model': cfg, 'data': _data_defaults()})
  )
  anchors = anchors_lib.anchors_from_config(cfg)

  @jax.jit
  def hand(variables, images, scale):
    cls, box = model.apply(variables, images, train=False)
    return postprocess.postprocess(
      cls,
      box,
      anchors,
      scale,
      num_classes=3,
      image_size=(128, 128),
      mode='global',
      max_detections=20,
    )

  for image, det in zip(images, dets, strict=True):
    ex = {
      'image': tf.constant(image),
      'boxes': tf.zeros([0, 4]),
      'classes': tf.zeros([0], tf.int32),
      'is_crowd': tf.zeros([0], tf.bool),
      'area': tf.zeros([0]),
      'image_id': tf.constant(0),
    }
    x = preprocess.eval_preprocess(ex, params)
    want = hand(
      variables, x['image'][None].numpy(), x['image_scale'][None].numpy()
    )
    n = int(want.valid_count[0])
    assert len(det.scores) == n > 0
    h, w = image.shape[:2]
    clipped = np.clip(want.boxes[0, :n], 0, [h, w, h, w])  # to the picture
    assert (np.asarray(want.boxes[0, :n]) > [h, w, h, w]).any()  # it mattered
    np.testing.assert_allclose(det.boxes, clipped, atol=1e-3)
    np.testing.assert_array_equal(det.classes, want.classes[0, :n])
    np.testing.assert_allclose(det.scores, want.scores[0, :n], atol=1e-6)


def _data_defaults():
  from effdet_jax.data.config import data_config

  return data_config()


def test_draw_puts_the_box_where_it_belongs():
  image = np.full((60, 80, 3), 128, np.uint8)
  det = inference.ImageDetections(
    boxes=np.array([[20.0, 10.0, 50.0, 70.0]]),
    scores=np.array([0.9]),
    classes=np.array([2]),
    names=['ellipse'],
  )
  out = effdet_jax.draw(image, det, line_width=1)
  colour = np.array(inference._PALETTE[2])
  assert (out[35, 10] == colour).all() and (out[35, 70] == colour).all()
  assert (out[49, 40] == image[49, 40]).all()  # inside: untouched
  assert (out[50, 40] == colour).all()
  assert (image == 128).all()  # the input is not modified


@pytest.mark.slow
def test_infer_folder_skips_a_corrupt_image(tiny, photos, tmp_path):
  model, variables = tiny
  ckpt = tmp_path / 'ckpt'
  api.save(str(ckpt), tiny.config, variables)
  folder = tmp_path / 'in'
  folder.mkdir()
  for p in photos:
    (folder / p.name).write_bytes(p.read_bytes())
  (folder / 'broken.jpg').write_bytes(b'\xff\xd8 not a jpeg')
  loaded = effdet_jax.load(str(ckpt))
  predictor = inference.Predictor(
    loaded[0], loaded[1], loaded.config, batch_size=2, max_boxes=5
  )
  out = tmp_path / 'out'
  summary = infer.run(predictor, str(folder), str(out), min_score=0.0)
  assert summary['processed'] == 3
  assert [s['file'] for s in summary['skipped']] == [str(folder / 'broken.jpg')]
  dets = json.loads((out / 'detections.json').read_text())
  assert {d['image_id'] for d in dets} == {p.name for p in photos}
  assert len(dets) == 15
  for p in photos:
    drawn = np.asarray(Image.open(out / (p.stem + '.png')))
    original = np.asarray(Image.open(p).convert('RGB'))
    assert drawn.shape == original.shape
    assert (drawn != original).any()
  # The reloaded weights are the saved ones: same detections as predict.
  again = effdet_jax.predict(
    (model, variables),
    [str(photos[0])],
    config=tiny.config,
    min_score=0.0,
    max_boxes=5,
  )[0]
  first = [d for d in dets if d['image_id'] == photos[0].name]
  np.testing.assert_allclose(
    [d['score'] for d in first], again.scores, atol=1e-6
  )


@pytest.mark.slow
def test_infer_gif_video(tiny, tmp_path):
  rng = np.random.default_rng(0)
  frames = [
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), np.uint8))
    for _ in range(3)
  ]
  video = tmp_path / 'clip.gif'
  frames[0].save(video, save_all=True, append_images=frames[1:])
  predictor = inference.Predictor(
    tiny[0], tiny[1], tiny.config, batch_size=2, max_boxes=3
  )
  out = tmp_path / 'out'
  summary = infer.run(predictor, str(video), str(out), min_score=0.0)
  assert summary['processed'] == 3
  assert sorted(p.name for p in (out / 'frames').iterdir()) == [
    '000000.png',
    '000001.png',
    '000002.png',
  ]
  with Image.open(out / 'clip.gif') as drawn:
    assert drawn.n_frames == 3 and drawn.size == (96, 64)
  dets = json.loads((out / 'detections.json').read_text())
  assert sorted({d['image_id'] for d in dets}) == [0, 1, 2]


class _NoPredictor:
  """Never asked: nothing in these inputs decodes."""

  batch_size = 2

  def predict_arrays(self, *args, **kwargs):
    raise AssertionError('no image should reach the model')


def test_infer_input_with_nothing_to_read_is_an_error(tmp_path):
  from absl import app

  with pytest.raises(app.UsageError, match='no such file or folder'):
    infer.check_input(str(tmp_path / 'nope'))
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'notes.txt').write_text('not an image')
  with pytest.raises(app.UsageError, match=f'--input={empty}: the folder has'):
    infer.check_input(str(empty))
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'a.jpg').write_bytes(b'\xff\xd8 not a jpeg')
  infer.check_input(str(broken))  # an image file: only decoding tells
  out = tmp_path / 'out'
  with pytest.raises(infer.NothingReadError) as err:
    infer.run(_NoPredictor(), str(broken), str(out), min_score=0.0)
  assert f'no image could be read from {broken}' in str(err.value)
  assert str(broken / 'a.jpg') in str(err.value)
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['processed'] == 0 and len(summary['skipped']) == 1


@pytest.mark.slow
def test_infer_command_exits_nonzero_without_input(tmp_path):
  """Both fail in seconds, before the (here missing) checkpoint loads."""
  import subprocess
  import sys

  from conftest import REPO

  def infer_command(*args):
    return subprocess.run(
      [sys.executable, '-m', 'effdet_jax.tools.infer', *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
    )

  common = [f'--checkpoint={tmp_path / "ckpt"}', f'--output={tmp_path / "o"}']
  missing = infer_command(*common)
  assert missing.returncode != 0
  assert '--input is required' in missing.stderr
  (tmp_path / 'empty').mkdir()
  empty = infer_command(*common, f'--input={tmp_path / "empty"}')
  assert empty.returncode != 0
  assert 'the folder has no image files' in empty.stderr
  assert 'model_config.json' not in empty.stderr  # not as far as the model
