"""COCO evaluation throughput: the network alone vs the whole evaluation.

  python benchmarks/evaluation.py [--model=efficientdet-d0] [--batch=8]
      [--data=../shared/data/coco128] [--format=table|json]

Whole evaluation = `Evaluator.run` (read + decode + preprocess in tf.data,
forward, post-processing with the official COCO-eval settings, host
conversion, COCOeval), timed on its second pass so compilation is
excluded. Network = the jitted `model.apply` on one batch, median of
repeats, times the number of batches of a pass. Random weights: the
post-processing cost does not depend on them much (soft-NMS always fills
its 100 slots at score threshold 0.001).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import jax
import numpy as np

import effdet_jax
from effdet_jax.data import testing
from effdet_jax.detection import anchors as anchors_lib
from effdet_jax.detection import postprocess
from effdet_jax.evaluation import runner

REPO = pathlib.Path(__file__).resolve().parents[1]


def _median_s(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--model', default='efficientdet-d0')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument(
    '--data', default=str(REPO.parent / 'shared' / 'data' / 'coco128')
  )
  parser.add_argument('--format', choices=('table', 'json'), default='table')
  args = parser.parse_args()

  data = pathlib.Path(args.data)
  config = testing.small_config(
    image_size=None,
    batch_size=args.batch,
    model=args.model,
    source='coco_json',
    eval_json=str(data / 'annotations.json'),
    eval_images=str(data / 'images'),
  )
  evaluator = runner.Evaluator(config, None)
  _, variables = effdet_jax.create_model(config)
  evaluator.run(variables)  # compile + warm caches
  start = time.perf_counter()
  result = evaluator.run(variables)
  whole_s = time.perf_counter() - start
  n = result.num_images

  model = evaluator.model
  h, w = config.model.image_size
  images = np.zeros([args.batch, h, w, 3], np.float32)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  net_s = _median_s(lambda: forward(variables, images), args.repeats)
  anchors = anchors_lib.anchors_from_config(config.model)
  kwargs = postprocess.postprocess_kwargs(config)
  detect = jax.jit(
    lambda v, x: postprocess.postprocess(
      *model.apply(v, x, train=False), anchors, None, **kwargs
    )
  )
  det_s = _median_s(lambda: detect(variables, images), args.repeats)
  batches = -(-n // args.batch)
  row = {
    'model': f'{args.model} {h}x{w}',
    'batch': args.batch,
    'images': n,
    'network_images_per_s': batches * args.batch / (batches * net_s),
    'network_postprocess_images_per_s': args.batch / det_s,
    'whole_eval_images_per_s': n / whole_s,
    'overhead_vs_network': whole_s / (batches * net_s) - 1.0,
    'AP_random_weights': result.metrics['AP'],
    'devices': str(jax.devices()[0].platform),
    'cpus': os.cpu_count(),
  }
  if args.format == 'json':
    print(json.dumps(row))
    return
  print(
    '| model | batch | images | network img/s | network+postprocess img/s '
    '| whole eval img/s | overhead vs network |'
  )
  print('|---|---|---|---|---|---|---|')
  print(
    f'| {row["model"]} | {args.batch} | {n} '
    f'| {row["network_images_per_s"]:.2f} '
    f'| {row["network_postprocess_images_per_s"]:.2f} '
    f'| {row["whole_eval_images_per_s"]:.2f} '
    f'| {100 * row["overhead_vs_network"]:+.1f} % |'
  )


if __name__ == '__main__':
  main()
