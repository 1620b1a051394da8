"""Losses against effdet's DetectionLoss and hand computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_ref import import_effdet

import effdet_jax
from effdet_jax.detection import anchors, losses, targets

SIZE, C = 128, 6


def _case(seed):
  rng = np.random.default_rng(seed)
  cfg = effdet_jax.model_config('efficientdet-d0', num_classes=C)
  anc = anchors.anchors_from_config(cfg, SIZE)
  b = 3
  boxes = np.zeros((b, 8, 4), np.float32)
  classes = np.full((b, 8), -1, np.int32)
  for i in range(b - 1):  # the last image has no boxes
    n = rng.integers(1, 9)
    yx = rng.uniform(0, SIZE - 40, (n, 2))
    hw = rng.uniform(8, 60, (n, 2))
    boxes[i, :n] = np.concatenate([yx, yx + hw], 1)
    classes[i, :n] = rng.integers(1, C + 1, n)
  t = targets.assign(anc, boxes, classes)
  shapes = [(b, SIZE // 2**lvl, SIZE // 2**lvl) for lvl in range(3, 8)]
  cls_out = [rng.normal(0, 2, s + (9 * C,)).astype(np.float32) for s in shapes]
  box_out = [rng.normal(0, 0.3, s + (36,)).astype(np.float32) for s in shapes]
  return anc, t, shapes, cls_out, box_out


@pytest.mark.parametrize('label_smoothing', [0.0, 0.1])
@pytest.mark.slow
def test_loss_equals_effdet(label_smoothing):
  effdet = import_effdet()
  import torch

  anc, t, shapes, cls_out, box_out = _case(0)
  total, parts = losses.detection_loss(
    cls_out, box_out, t, num_classes=C, label_smoothing=label_smoothing
  )
  # Split our flat targets per level for effdet: [B, H, W, A] / [B, H, W, A*4].
  cls_t, box_t, start = [], [], 0
  for b, h, w in shapes:
    n = h * w * 9
    cls_t.append(
      torch.from_numpy(
        np.asarray(t.cls_targets[:, start : start + n]).reshape(b, h, w, 9)
      ).long()
    )
    box_t.append(
      torch.from_numpy(
        np.asarray(t.box_targets[:, start : start + n]).reshape(b, h, w, 36)
      )
    )
    start += n
  nchw = lambda xs: [torch.from_numpy(x).permute(0, 3, 1, 2) for x in xs]  # noqa: E731
  ref_total, ref_cls, ref_box = effdet.loss.loss_fn(
    nchw(cls_out),
    nchw(box_out),
    cls_t,
    box_t,
    torch.from_numpy(np.asarray(t.num_positives)),
    num_classes=C,
    alpha=0.25,
    gamma=1.5,
    delta=0.1,
    box_loss_weight=50.0,
    label_smoothing=label_smoothing,
  )
  for ours, ref in (
    (total, ref_total),
    (parts['cls_loss'], ref_cls),
    (parts['box_loss'], ref_box),
  ):
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)


def test_focal_loss_hand_computed():
  # One positive logit z=0: p=0.5, p_t=0.5, alpha_t=0.25, CE=log 2.
  val = losses.focal_loss(jnp.array([0.0]), jnp.array([1.0]))
  assert float(val[0]) == pytest.approx(0.25 * 0.5**1.5 * math.log(2), rel=1e-6)
  # Negative with z=2: p_t = 1 - sigmoid(2); alpha_t = 0.75.
  p = 1 / (1 + math.exp(-2))
  val = losses.focal_loss(jnp.array([2.0]), jnp.array([0.0]))
  ce = 2 + math.log1p(math.exp(-2))
  assert float(val[0]) == pytest.approx(0.75 * p**1.5 * ce, rel=1e-6)


def test_empty_batch_gives_finite_loss():
  anc, _, shapes, cls_out, box_out = _case(1)
  t = targets.assign(anc, jnp.zeros((3, 4, 4)), -jnp.ones((3, 4), jnp.int32))
  total, parts = losses.detection_loss(
    cls_out, box_out, t, num_classes=C, iou_loss_type='ciou', anchors=anc
  )
  assert np.isfinite(float(total))
  assert float(parts['box_loss']) == 0.0 and float(parts['iou_loss']) == 0.0


def test_iou_family_hand_computed():
  a = jnp.array([0.0, 0.0, 2.0, 2.0])
  b = jnp.array([1.0, 1.0, 3.0, 3.0])  # inter 1, union 7, enclose 9
  assert float(losses.box_iou_family(a, b, 'iou')) == pytest.approx(1 / 7)
  assert float(losses.box_iou_family(a, b, 'giou')) == pytest.approx(
    1 / 7 - 2 / 9
  )
  # centres 1 apart in y and x -> rho^2 = 2; enclosing diagonal^2 = 18.
  assert float(losses.box_iou_family(a, b, 'diou')) == pytest.approx(
    1 / 7 - 2 / 18
  )
  assert float(losses.box_iou_family(a, b, 'ciou')) == pytest.approx(
    1 / 7 - 2 / 18
  )  # same aspect
  c = jnp.array([0.0, 0.0, 1.0, 4.0])  # aspect 4 vs 1
  v = 4 / math.pi**2 * (math.atan(1.0) - math.atan(4.0)) ** 2
  iou = float(losses.box_iou_family(c, a, 'iou'))
  diou = float(losses.box_iou_family(c, a, 'diou'))
  assert float(losses.box_iou_family(c, a, 'ciou')) == pytest.approx(
    diou - v / (1 - iou + v) * v, rel=1e-5
  )
  for kind in ('iou', 'giou', 'diou', 'ciou'):
    assert float(losses.box_iou_family(a, a, kind)) == pytest.approx(1.0)


@pytest.mark.slow
def test_iou_loss_falls_as_prediction_improves():
  anc, t, _, cls_out, box_out = _case(2)
  zero = [np.zeros_like(b) for b in box_out]
  _, bad = losses.detection_loss(
    cls_out, box_out, t, num_classes=C, iou_loss_type='giou', anchors=anc
  )
  _, good = losses.detection_loss(
    cls_out, zero, t, num_classes=C, iou_loss_type='giou', anchors=anc
  )
  # zero codes = anchors, which overlap their matched boxes well.
  assert float(good['iou_loss']) < float(bad['iou_loss'])
  grads = jax.grad(
    lambda bo: losses.detection_loss(
      cls_out, bo, t, num_classes=C, iou_loss_type='ciou', anchors=anc
    )[0]
  )(box_out)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
