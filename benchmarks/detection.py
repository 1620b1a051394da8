"""Target assignment and post-processing: ours (jitted) vs effdet (host).

  python benchmarks/detection.py [--batch=8] [--model=efficientdet-d0]
      [--repeats=5] [--format=table|json]

Per batch at the model's image size (D0: 512, 49,104 anchors), with
ground truth padded to 100 boxes: `assign_coco` has 1-39 real boxes per
image (COCO averages 7), `assign_full` 100. effdet's
labeler is its host-side `AnchorLabeler.batch_label_anchors`; its
post-processing is `_post_process` + `_batch_detection(soft_nms=True)`
(top-5000 then per-class Gaussian soft-NMS, as the official eval).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

import effdet_jax
from effdet_jax.detection import anchors as anchors_lib
from effdet_jax.detection import postprocess, targets


def _median_ms(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append((time.perf_counter() - t) * 1e3)
  return float(np.median(times))


def _ground_truth(rng, batch, size, full, max_boxes=100):
  boxes = np.zeros((batch, max_boxes, 4), np.float32)
  classes = np.full((batch, max_boxes), -1, np.int32)
  counts = np.full(batch, max_boxes) if full else rng.integers(1, 40, batch)
  for i, n in enumerate(counts):
    yx = rng.uniform(0, size * 0.8, (n, 2))
    hw = np.exp(rng.uniform(np.log(8), np.log(size / 2), (n, 2)))
    boxes[i, :n] = np.concatenate([yx, np.minimum(yx + hw, size - 1)], 1)
    classes[i, :n] = rng.integers(1, 91, n)
  return boxes, classes, counts


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--model', default='efficientdet-d0')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--format', choices=['table', 'json'], default='table')
  a = p.parse_args()
  cfg = effdet_jax.model_config(a.model)
  size = cfg.image_size[0]
  anc = anchors_lib.anchors_from_config(cfg)
  rng = np.random.default_rng(0)
  shapes = [
    (a.batch, -(-size // 2**lvl), -(-size // 2**lvl))
    for lvl in range(cfg.min_level, cfg.max_level + 1)
  ]
  cls_out = [
    rng.normal(-4, 1.5, s + (9 * 90,)).astype(np.float32) for s in shapes
  ]
  box_out = [rng.normal(0, 0.2, s + (36,)).astype(np.float32) for s in shapes]

  assign = jax.jit(lambda b, c: targets.assign(anc, b, c))
  post = jax.jit(
    lambda c, b: postprocess.postprocess(
      c,
      b,
      anc,
      num_classes=90,
      image_size=size,
      mode='per_class',
      max_nms_inputs=5000,
    )
  )
  gts = {
    'coco': _ground_truth(rng, a.batch, size, full=False),
    'full': _ground_truth(rng, a.batch, size, full=True),
  }
  rows = {
    f'assign_{k}_ours_ms': _median_ms(
      lambda b=b, c=c: jax.block_until_ready(assign(b, c)), a.repeats
    )
    for k, (b, c, _) in gts.items()
  }
  rows |= {
    'postprocess_ours_ms': _median_ms(
      lambda: jax.block_until_ready(post(cls_out, box_out)), a.repeats
    ),
  }
  try:
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / 'tests'))
    import torch
    from torch_ref import import_effdet

    effdet = import_effdet()
    ref_anchors = effdet.anchors.Anchors(
      3, 7, 3, [1.0, 2.0, 0.5], 4.0, (size, size)
    )
    labeler = effdet.anchors.AnchorLabeler(ref_anchors, 90, 0.5)
    for k, (boxes, classes, counts) in gts.items():
      tb = [torch.from_numpy(boxes[i, :n]) for i, n in enumerate(counts)]
      tc = [torch.from_numpy(classes[i, :n]) for i, n in enumerate(counts)]
      rows[f'assign_{k}_effdet_ms'] = _median_ms(
        lambda tb=tb, tc=tc: labeler.batch_label_anchors(tb, tc), a.repeats
      )
    from effdet.bench import _batch_detection, _post_process

    tcls = [torch.from_numpy(x).permute(0, 3, 1, 2) for x in cls_out]
    tbox = [torch.from_numpy(x).permute(0, 3, 1, 2) for x in box_out]

    def effdet_post():
      c, b, idx, cl = _post_process(tcls, tbox, 5, 90, 5000)
      return _batch_detection(
        a.batch, c, b, ref_anchors.boxes, idx, cl, soft_nms=True
      )

    rows['postprocess_effdet_ms'] = _median_ms(
      effdet_post, max(1, a.repeats // 2)
    )
  except ImportError as err:  # effdet is a test extra
    print(f'effdet not available ({err}); ours only', file=sys.stderr)
  if a.format == 'json':
    print(json.dumps({'model': a.model, 'batch': a.batch, **rows}))
    return
  dev = jax.devices()[0]
  print(
    f'{a.model} @ {size}, batch {a.batch}, {len(anc)} anchors; '
    f'device {dev.platform}'
  )
  print('| step | ours (jit) ms | effdet (host) ms |')
  print('|---|---|---|')
  for step in ('assign_coco', 'assign_full', 'postprocess'):
    ref = rows.get(f'{step}_effdet_ms')
    print(
      f'| {step} | {rows[f"{step}_ours_ms"]:.1f} '
      f'| {"n/a" if ref is None else f"{ref:.1f}"} |'
    )


if __name__ == '__main__':
  main()
