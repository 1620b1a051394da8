"""On-device target assignment vs effdet's AnchorLabeler, plus properties.

Every test runs twice: with the jnp matcher and with the CPU kernel that
computes its IoU maxima (`native_match`), where the kernels are built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_ref import import_effdet

import effdet_jax
from effdet_jax import ops
from effdet_jax.cpu import library as cpu_library
from effdet_jax.cpu import native_match
from effdet_jax.detection import anchors, targets

SIZE = 256
NUM_CLASSES = 20


@pytest.fixture(autouse=True, params=[False, True], ids=['xla', 'cpu_kernel'])
def matcher(request):
  """Every test with the plain matcher (the 'xla' backend) and with the
  cpu backend's kernel."""
  if request.param and not cpu_library.load():
    pytest.skip('CPU kernels not built here')
  backend = 'cpu' if request.param else 'xla'
  with ops.use_backend(backend), cpu_library.forced(request.param):
    _MATCHER[0] = request.param
    yield request.param


_MATCHER = [None]  # the running test's matcher (set by the fixture above)
_JITTED = {}


def _jitted(fn):
  """`fn` jitted, once per matcher (the backend is read while tracing):
  eager, every op would compile anew for each box count."""
  key = (fn.__name__, _MATCHER[0])
  if key not in _JITTED:
    _JITTED[key] = jax.jit(fn)
  return _JITTED[key]


def _assign(*args):
  return _jitted(targets.assign)(*args)


@pytest.fixture(scope='module')
def d0_anchors():
  cfg = effdet_jax.model_config('efficientdet-d0')
  return anchors.anchors_from_config(cfg, SIZE)


def _random_batch(rng, batch, max_boxes=100):
  """Boxes of all sizes, some partly outside the image, 0..100 per image."""
  boxes = np.zeros((batch, max_boxes, 4), np.float32)
  classes = np.full((batch, max_boxes), -1, np.int32)
  for i in range(batch):
    n = (
      int(rng.integers(0, max_boxes + 1)) if i % 7 else int(rng.integers(0, 3))
    )
    size = np.exp(rng.uniform(np.log(2), np.log(2 * SIZE), (n, 2)))
    centre = rng.uniform(-0.1 * SIZE, 1.1 * SIZE, (n, 2))
    boxes[i, :n, :2] = centre - size / 2
    boxes[i, :n, 2:] = centre + size / 2
    classes[i, :n] = rng.integers(1, NUM_CLASSES + 1, n)
    # A few degenerate boxes: ignored by our documented rule.
    if n > 3:
      boxes[i, 1, 2] = boxes[i, 1, 0]
  return boxes, classes


@pytest.mark.slow
def test_assignment_equals_effdet_labeler(d0_anchors):
  effdet = import_effdet()
  import torch

  ref_anchors = effdet.anchors.Anchors(
    3, 7, 3, [1.0, 2.0, 0.5], 4.0, (SIZE, SIZE)
  )
  labeler = effdet.anchors.AnchorLabeler(ref_anchors, NUM_CLASSES, 0.5)
  assign = jax.jit(lambda b, c: targets.assign(d0_anchors, b, c))
  rng = np.random.default_rng(0)
  compared = 0
  for _ in range(5):
    boxes, classes = _random_batch(rng, 48)
    ours = jax.device_get(assign(boxes, classes))
    for i in range(boxes.shape[0]):
      area = (boxes[i, :, 2] - boxes[i, :, 0]) * (
        boxes[i, :, 3] - boxes[i, :, 1]
      )
      cls_ref = np.where(area > 0, classes[i], -1)  # our degenerate-box rule
      cls_t, box_t, num_pos = labeler.label_anchors(
        torch.from_numpy(boxes[i]), torch.from_numpy(cls_ref)
      )
      ref_cls = np.concatenate([t.reshape(-1) for t in cls_t])
      ref_box = np.concatenate([t.reshape(-1, 4) for t in box_t])
      np.testing.assert_array_equal(ours.cls_targets[i], ref_cls)
      np.testing.assert_allclose(ours.box_targets[i], ref_box, atol=1e-5)
      assert ours.num_positives[i] == float(num_pos)
      np.testing.assert_array_equal(ours.positive[i], ref_cls >= 0)
      compared += 1
  assert compared >= 200


def test_empty_ground_truth_is_all_negative(d0_anchors):
  t = targets.assign(
    d0_anchors, jnp.zeros((2, 5, 4)), -jnp.ones((2, 5), jnp.int32)
  )
  assert not np.asarray(t.positive).any() and np.asarray(t.negative).all()
  assert np.asarray(t.num_positives).tolist() == [0.0, 0.0]
  assert (np.asarray(t.cls_targets) == -1).all()


def test_force_match_lowest_index_wins():
  anchors_ = jnp.array(
    [[0, 0, 10, 10], [0, 20, 10, 30], [50, 50, 60, 60]], jnp.float32
  )
  # Two identical boxes whose best anchor is 0 (IoU < 0.5 for both).
  boxes = jnp.array([[[0, 0, 10, 30], [0, 0, 10, 30]]], jnp.float32)
  t = targets.assign(anchors_, boxes, jnp.array([[3, 7]]))
  assert np.asarray(t.cls_targets[0]).tolist() == [2, -1, -1]


def test_thresholds_give_ignored_band():
  anchors_ = jnp.array(
    [[0, 0, 10, 10], [0, 0, 10, 16], [0, 0, 10, 40]], jnp.float32
  )
  boxes = jnp.array([[[0, 0, 10, 10]]], jnp.float32)  # IoU 1, 0.625, 0.25
  t = targets.assign(anchors_, boxes, jnp.array([[1]]), 0.7, 0.5)
  assert np.asarray(t.positive[0]).tolist() == [True, False, False]
  assert np.asarray(t.ignored[0]).tolist() == [False, True, False]
  # Official: ignored anchors count in num_positives, class target -1.
  assert float(t.num_positives[0]) == 2.0
  assert np.asarray(t.cls_targets[0]).tolist() == [0, -1, -1]


small_boxes = st.lists(
  st.tuples(
    st.floats(0, 200),
    st.floats(0, 200),
    st.floats(4, 120),
    st.floats(4, 120),
    st.integers(1, 5),
  ),
  min_size=1,
  max_size=8,
)


@settings(max_examples=40, deadline=None)
@given(items=small_boxes, perm_seed=st.integers(0, 1000), pad=st.integers(0, 4))
@pytest.mark.slow
def test_assignment_invariant_to_order_and_padding(items, perm_seed, pad):
  anchors_ = anchors.generate_anchors(256, 3, 7, 3, (1.0, 2.0, 0.5), 4.0)
  arr = np.array([[y, x, y + h, x + w] for y, x, h, w, _ in items], np.float32)
  cls = np.array([c for *_, c in items], np.int32)
  # Exact ties between distinct boxes make "first wins" order-dependent.
  if len(np.unique(arr, axis=0)) < len(arr):
    return
  perm = np.random.default_rng(perm_seed).permutation(len(items))
  # Eager on purpose: compiled per box count, the IoU's rounding (and so
  # which near-ties are exact) would depend on the padding.
  a = targets.assign(anchors_, arr[None], cls[None])
  padded_b = np.concatenate([arr[perm], np.zeros((pad, 4), np.float32)])[None]
  padded_c = np.concatenate([cls[perm], -np.ones(pad, np.int32)])[None]
  b = targets.assign(anchors_, padded_b, padded_c)
  same = np.asarray(a.cls_targets) == np.asarray(b.cls_targets)
  # Reordering may only change which of two boxes with equal IoU an anchor
  # takes; positives and num_positives never change.
  np.testing.assert_array_equal(np.asarray(a.positive), np.asarray(b.positive))
  assert float(a.num_positives[0]) == float(b.num_positives[0])
  iou = np.asarray(targets.iou_matrix(jnp.asarray(arr), jnp.asarray(anchors_)))
  tied = (
    (np.sort(iou, 0)[-1] == np.sort(iou, 0)[-2])
    if len(arr) > 1
    else np.zeros(iou.shape[1], bool)
  )
  assert same[0][~tied].all()


@settings(max_examples=60, deadline=None)
@given(idx=st.integers(0, 12275), cls=st.integers(1, 90))
@pytest.mark.slow
def test_box_equal_to_anchor_is_positive(idx, cls):
  anchors_ = anchors.generate_anchors(256, 3, 7, 3, (1.0, 2.0, 0.5), 4.0)
  t = _assign(anchors_, anchors_[idx][None, None], jnp.array([[cls]]))
  assert bool(t.positive[0, idx])
  assert int(t.cls_targets[0, idx]) == cls - 1
  np.testing.assert_allclose(np.asarray(t.box_targets[0, idx]), 0.0, atol=1e-5)


def test_inverted_corners_are_normalised():
  anchors_ = jnp.array([[0, 0, 10, 10], [20, 20, 30, 30]], jnp.float32)
  t1 = targets.assign(
    anchors_, jnp.array([[[0, 0, 10, 10.0]]]), jnp.array([[2]])
  )
  t2 = targets.assign(
    anchors_, jnp.array([[[10, 10, 0, 0.0]]]), jnp.array([[2]])
  )
  np.testing.assert_array_equal(
    np.asarray(t1.cls_targets), np.asarray(t2.cls_targets)
  )
  np.testing.assert_allclose(
    np.asarray(t1.box_targets), np.asarray(t2.box_targets)
  )


@pytest.mark.parametrize('matcher', [True], ids=['kernel'], indirect=True)
@pytest.mark.parametrize('n_anchors', [12276, 5000, 7])
def test_native_best_matches_equal_jnp(d0_anchors, matcher, n_anchors):
  """The kernel's IoU maxima are the jnp loop's, bit for bit: values, the
  first row per anchor and the first anchor per box (ties from duplicate
  boxes and boxes equal to anchors), for all D0 anchors at 256 (three
  blocks, a tail of 4), 5000 (a tail of 8) and 7 (no full vector), and
  batches with empty images and padding between boxes."""
  anchors_ = jnp.asarray(d0_anchors[:n_anchors])
  rng = np.random.default_rng(1)
  boxes, classes = _random_batch(rng, 8, 40)
  boxes[0, 3] = boxes[0, 2]  # a duplicate: the first row wins
  boxes[1, 0] = np.asarray(d0_anchors[n_anchors // 2])  # IoU exactly 1
  classes[1, 0] = 1
  classes[2, :] = -1  # an empty image
  classes[3, 1] = -1  # padding between boxes
  boxes = targets.normalize_corners(jnp.asarray(boxes))
  area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
  valid = (jnp.asarray(classes) > 0) & (area > 0)
  with cpu_library.forced(True):
    assert native_match.supports(boxes.dtype)
    got = jax.jit(targets._best_matches, static_argnums=3)(
      anchors_, boxes, valid, 8
    )
  with cpu_library.forced(False):
    want = jax.jit(targets._best_matches, static_argnums=3)(
      anchors_, boxes, valid, 8
    )
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  none = jnp.zeros_like(valid)
  with cpu_library.forced(True):
    got = targets._best_matches(anchors_, boxes, none, 8)
  with cpu_library.forced(False):
    want = targets._best_matches(anchors_, boxes, none, 8)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
