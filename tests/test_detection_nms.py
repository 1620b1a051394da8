"""NMS against TensorFlow's own kernel, and post-processing vs the oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effdet_jax
from effdet_jax.detection import anchors, nms, postprocess

tf = pytest.importorskip('tensorflow')


def _random_case(rng, k):
  yx = rng.uniform(0, 100, (k, 2))
  hw = rng.uniform(1, 40, (k, 2))
  boxes = np.concatenate([yx, yx + hw], 1).astype(np.float32)
  if rng.random() < 0.3:  # some inverted corners: TF sorts them
    boxes[::5] = boxes[::5][:, [2, 3, 0, 1]]
  scores = rng.uniform(0, 1, k).astype(np.float32)
  return boxes, scores


@pytest.mark.parametrize('variant', ['hard', 'soft'])
@pytest.mark.slow
def test_nms_equals_tensorflow(variant):
  rng = np.random.default_rng(0 if variant == 'hard' else 1)
  sigma = 0.25 if variant == 'soft' else 0.0
  thresh = 0.001 if variant == 'soft' else 0.3
  fn = jax.jit(
    lambda b, s: nms.non_max_suppression(b, s, 20, 0.5, thresh, sigma)
  )
  for case in range(120):
    k = int(rng.integers(1, 60))
    boxes, scores = _random_case(rng, k)
    idx, sc, count = jax.device_get(fn(boxes, scores))
    ref_idx, ref_sc = tf.image.non_max_suppression_with_scores(
      boxes,
      scores,
      20,
      iou_threshold=0.5,
      score_threshold=thresh,
      soft_nms_sigma=sigma,
    )
    ref_idx, ref_sc = ref_idx.numpy(), ref_sc.numpy()
    assert count == len(ref_idx), case
    np.testing.assert_array_equal(idx[:count], ref_idx)
    np.testing.assert_allclose(sc[:count], ref_sc, atol=1e-5)
    assert (idx[count:] == -1).all()


def test_soft_nms_hand_checked():
  boxes = np.array(
    [[0, 0, 10, 10], [0, 5, 10, 15], [20, 20, 30, 30]], np.float32
  )
  scores = np.array([0.9, 0.8, 0.5], np.float32)
  idx, sc, count = nms.non_max_suppression(boxes, scores, 3, 0.5, 0.001, 0.25)
  # IoU(0, 1) = 50 / 150 = 1/3: 0.8 * exp(-2 / 9) = 0.6408 > 0.5.
  assert int(count) == 3
  assert np.asarray(idx).tolist() == [0, 1, 2]
  np.testing.assert_allclose(
    np.asarray(sc), [0.9, 0.8 * np.exp(-2 / 9), 0.5], rtol=1e-6
  )


def test_class_aware_equals_per_class_merge():
  rng = np.random.default_rng(3)
  boxes, scores = _random_case(rng, 80)
  classes = rng.integers(0, 4, 80)
  idx, sc, count = nms.non_max_suppression(
    boxes, scores, 30, 0.5, 0.001, 0.25, classes=jnp.asarray(classes)
  )
  merged = []
  for c in range(4):
    m = np.where(classes == c)[0]
    i, s = tf.image.non_max_suppression_with_scores(
      boxes[m], scores[m], 30, 0.5, 0.001, 0.25
    )
    merged += list(zip(s.numpy(), m[i.numpy()], strict=True))
  merged.sort(key=lambda t: -t[0])
  count = int(count)
  assert count == min(30, len(merged))
  np.testing.assert_allclose(
    np.asarray(sc)[:count], [s for s, _ in merged[:count]], atol=1e-5
  )
  assert set(np.asarray(idx)[:count].tolist()) == {i for _, i in merged[:count]}


@pytest.mark.parametrize('mode', ['global', 'per_class'])
def test_postprocess_equals_official(oracle_dir, mode):
  out = np.load(oracle_dir / 'outputs.npz')
  det = np.load(oracle_dir / 'detections.npz')
  cls = [out[f'cls_l{lvl}'] for lvl in range(3, 8)]
  box = [out[f'box_l{lvl}'] for lvl in range(3, 8)]
  anc = anchors.anchors_from_config(
    effdet_jax.model_config('efficientdet-d0'), 256
  )
  d = postprocess.postprocess(
    cls, box, anc, num_classes=90, image_size=256, mode=mode
  )
  v = int(det[f'{mode}_valid'][0])
  assert int(d.valid_count[0]) == v
  np.testing.assert_allclose(
    np.asarray(d.boxes[0, :v]), det[f'{mode}_boxes'][0, :v], atol=1e-3
  )
  np.testing.assert_allclose(
    np.asarray(d.scores[0, :v]), det[f'{mode}_scores'][0, :v], atol=1e-5
  )
  np.testing.assert_array_equal(
    np.asarray(d.classes[0, :v]), det[f'{mode}_classes'][0, :v].astype(int)
  )


@pytest.mark.slow
def test_postprocess_topk_scale_and_nonfinite():
  rng = np.random.default_rng(0)
  anc = anchors.generate_anchors(128, 3, 7, 3, (1.0, 2.0, 0.5), 4.0)
  shapes = [(2, 128 // 2**lvl, 128 // 2**lvl) for lvl in range(3, 8)]
  cls = [rng.normal(-3, 2, s + (9 * 4,)).astype(np.float32) for s in shapes]
  box = [rng.normal(0, 0.2, s + (36,)).astype(np.float32) for s in shapes]
  cls[0][0, 0, 0, :5] = np.nan  # anchors 0 and 1 of one location
  box[1][1, 0, 0, :4] = np.inf
  box[2][1, 1, 1, 2] = 1e4  # anchor 0's th: exp overflows -> inf box
  cls[2][1, 1, 1, :4] = 10.0  # ...and it is a confident candidate
  fn = jax.jit(
    lambda c, b, s: postprocess.postprocess(
      c,
      b,
      anc,
      s,
      num_classes=4,
      image_size=128,
      mode='per_class',
      max_nms_inputs=500,
      max_detections=50,
    )
  )
  d = jax.device_get(fn(cls, box, np.array([1.0, 2.0], np.float32)))
  assert d.num_nonfinite.tolist() == [2, 2]
  assert np.isfinite(d.boxes).all() and np.isfinite(d.scores).all()
  assert ((d.classes >= 1) & (d.classes <= 4) | (d.classes == -1)).all()
  d1 = jax.device_get(fn(cls, box, np.array([1.0, 1.0], np.float32)))
  np.testing.assert_allclose(d.boxes[1], 2 * d1.boxes[1], rtol=1e-6)
  # hard NMS + global path clips to the input size.
  g = postprocess.postprocess(
    cls, box, anc, num_classes=4, image_size=128, mode='global', method='hard'
  )
  assert float(jnp.max(g.boxes)) <= 128 and float(jnp.min(g.boxes)) >= 0
