"""Anchors and the box coder against the official code and effdet."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_ref import import_effdet

import effdet_jax
from effdet_jax.detection import anchors, box_coder


def test_anchors_equal_official_oracle(oracle_dir):
  ref = np.load(oracle_dir / 'anchors.npz')
  cfg = effdet_jax.model_config('efficientdet-d0')
  ours = anchors.anchors_from_config(cfg, 256)
  assert ours.shape == ref['boxes'].shape
  assert np.abs(ours - ref['boxes']).max() <= 1e-3
  assert anchors.level_sizes(256, 3, 7, 9) == list(ref['per_level'])


# Total anchors per model at its image size: 9 per location
# (`efficientdet/tf2/anchors.py: Anchors`) on the feature sizes of
# `efficientdet/utils.py: get_feat_sizes`.
TOTALS = {
  'efficientdet-d0': 49104,
  'efficientdet-d1': 76725,
  'efficientdet-d2': 110484,
  'efficientdet-d3': 150381,
  'efficientdet-d4': 196416,
  'efficientdet-d5': 306900,
  'efficientdet-d7': 441936,
  'efficientdet-d7x': 442260,
  'efficientdet-lite0': 19206,
  'efficientdet-lite1': 27621,
  'efficientdet-lite2': 37629,
}


@pytest.mark.parametrize('name', sorted(TOTALS))
@pytest.mark.slow
def test_anchor_totals_and_effdet_formula(name):
  effdet = import_effdet()
  cfg = effdet_jax.model_config(name)
  ours = anchors.anchors_from_config(cfg)
  assert ours.shape == (TOTALS[name], 4)
  # effdet's Anchors takes scalar ratios through the same sqrt path.
  ref = effdet.anchors.Anchors(
    cfg.min_level,
    cfg.max_level,
    cfg.num_scales,
    list(cfg.aspect_ratios),
    cfg.anchor_scale,
    tuple(cfg.image_size),
  ).boxes.numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-3)


@pytest.mark.parametrize('size', [(256, 384), (320, 192), (300, 500)])
def test_non_square_and_explicit_pairs(size):
  effdet = import_effdet()
  pairs = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))  # effdet / pre-Sep-2020
  ours = anchors.generate_anchors(size, 3, 7, 3, pairs, 4.0)
  ref = effdet.anchors.Anchors(3, 7, 3, list(pairs), 4.0, size).boxes.numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-3)
  # Scalars differ from the pairs (sqrt(2) vs 1.4) by about 1 % per side.
  scalar = anchors.generate_anchors(size, 3, 7, 3, (1.0, 2.0, 0.5), 4.0)
  assert 0.5 < np.abs(scalar - ours).max() < 10


def test_anchor_layout_facts():
  a = anchors.generate_anchors(512, 3, 7, 3, (1.0, 2.0, 0.5), 4.0)
  # D0 P3: stride 8, base 32 * 2^(s/3) -> 32, 40.3, 50.8 px; centre (4, 4).
  first = a[:9]
  sizes = first[:, 2] - first[:, 0]
  np.testing.assert_allclose(
    sizes[[0, 3, 6]], [32, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)], rtol=1e-5
  )
  np.testing.assert_allclose((first[:, 0] + first[:, 2]) / 2, 4.0)
  # Ratio 2.0 (index 1) is wider than tall: w/h = 2.
  w, h = first[1, 3] - first[1, 1], first[1, 2] - first[1, 0]
  assert w / h == pytest.approx(2.0, rel=1e-5)
  # Next location along x comes after the 9 anchors of (0, 0).
  assert (a[9, 1] + a[9, 3]) / 2 == pytest.approx(12.0)


box = st.tuples(
  st.floats(-100, 500),
  st.floats(-100, 500),
  st.floats(0.5, 400),
  st.floats(0.5, 400),
)


@settings(max_examples=200, deadline=None)
@given(b=box, a=box)
def test_decode_encode_roundtrip(b, a):
  to_yxyx = lambda t: jnp.array(
    [[t[0], t[1], t[0] + t[2], t[1] + t[3]]], jnp.float32
  )  # noqa: E731
  boxes, anch = to_yxyx(b), to_yxyx(a)
  back = box_coder.decode(box_coder.encode(boxes, anch), anch)
  np.testing.assert_allclose(
    np.asarray(back), np.asarray(boxes), atol=2e-3, rtol=1e-4
  )


def test_encoding_formula():
  anchor = jnp.array([[0.0, 0.0, 10.0, 20.0]])  # yc 5, xc 10, h 10, w 20
  target = jnp.array([[2.0, 4.0, 22.0, 14.0]])  # yc 12, xc 9, h 20, w 10
  np.testing.assert_allclose(
    box_coder.encode(target, anchor)[0],
    [0.7, -0.05, np.log(2.0), np.log(0.5)],
    rtol=1e-6,
  )
  # Zero-size boxes are clamped to 1e-8, not 1e-7 (effdet) or NaN.
  code = box_coder.encode(jnp.array([[5.0, 5.0, 5.0, 5.0]]), anchor)
  assert np.isfinite(np.asarray(code)).all()
  assert float(code[0, 2]) == pytest.approx(np.log(1e-8 / 10.0), rel=1e-6)
