"""Input-pipeline throughput: training images/s, per CPU core.

  python benchmarks/pipeline.py [--model=efficientdet-d0] [--policies=,v0]
      [--source=tfrecord|coco_json|synthetic] [--batches=30]

Reads the real coco128 images (../shared/data/coco128; converted to
TFRecords in a temporary folder for --source=tfrecord) through the full
training pipeline (decode, checks, [AutoAugment], normalise, flip, jitter,
resize, pad, batch) and reports images/s over all cores and per core, so
a TPU host's pipeline can be sized: cores needed = step images/s / per
core rate.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

COCO128 = pathlib.Path(__file__).resolve().parents[2] / 'shared/data/coco128'


def bench(config, batches: int, warmup: int = 5) -> float:
  from effdet_jax.data import pipeline

  it = pipeline.train_dataset(config).as_numpy_iterator()
  for _ in range(warmup):
    next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  dt = time.perf_counter() - t
  return batches * config.train.batch_size / dt


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--model', default='efficientdet-d0')
  parser.add_argument('--policies', default=',v0')
  parser.add_argument('--source', default='tfrecord')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--batches', type=int, default=30)
  args = parser.parse_args()

  from effdet_jax.data import create_tfrecord, testing

  cores = len(os.sched_getaffinity(0))
  tmp = tempfile.mkdtemp()
  data = dict(
    train_json=str(COCO128 / 'annotations.json'),
    train_images=str(COCO128 / 'images'),
    train_pattern=os.path.join(tmp, 'coco128-*.tfrecord'),
    synthetic_image_size=(480, 640),
  )
  if args.source == 'tfrecord':
    create_tfrecord.convert(
      'coco', data['train_json'], data['train_images'],
      os.path.join(tmp, 'coco128'), num_shards=8,
    )  # fmt: skip
  print(f'| model | source | AutoAugment | images/s ({cores} cores) | '
        'images/s per core |')  # fmt: skip
  print('|---|---|---|---|---|')
  for policy in args.policies.split(','):
    config = testing.small_config(
      image_size=None, batch_size=args.batch, model=args.model,
      source=args.source, autoaugment_policy=policy, **data,
    )  # fmt: skip
    rate = bench(config, args.batches)
    size = 'x'.join(map(str, config.model.image_size))
    print(
      f'| {args.model} {size} | {args.source} | {policy or "off"} | '
      f'{rate:.1f} | {rate / cores:.1f} |'
    )


if __name__ == '__main__':
  main()
