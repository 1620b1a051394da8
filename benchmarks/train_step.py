"""Train-step benchmark: compile time, step time, images/s, peak memory.

  python benchmarks/train_step.py [--model=efficientdet-d0] [--size=512]
      [--batch=8] [--dtype=float32,bfloat16] [--remat=false,true]
      [--repeats=3] [--format=table|json]

Random images and boxes (8 per image), one device, the real jitted step
(forward, on-device targets, loss, grads, clip, SGD, EMA). Peak memory is
the compiled program's temp + argument + output bytes (XLA memory
analysis), which is what remat changes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import numpy as np

from configs import base
from effdet_jax.train import trainer as trainer_lib


def bench(model, size, batch, dtype, remat, repeats):
  config = base.get_config(model)
  config.model.image_size = (size, size)
  config.model.dtype = dtype
  config.train.batch_size = batch
  config.train.remat = remat
  config.train.num_steps = 1000
  config.mesh.data = 1
  tr = trainer_lib.Trainer(config, tempfile.mkdtemp())
  rng = np.random.default_rng(0)
  boxes = np.zeros((batch, 100, 4), np.float32)
  classes = -np.ones((batch, 100), np.int32)
  yx = rng.uniform(0, size * 0.7, (batch, 8, 2))
  boxes[:, :8] = np.concatenate([yx, yx + size * 0.25], -1)
  classes[:, :8] = rng.integers(1, 91, (batch, 8))
  b = {
    'image': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
    'boxes': boxes,
    'classes': classes,
  }
  state = tr.fresh_state()
  fn = tr.step_fn(b)
  t = time.perf_counter()
  compiled = fn.lower(state, b).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = int(
      mem.temp_size_in_bytes
      + mem.argument_size_in_bytes
      + mem.output_size_in_bytes
    )
  state, _ = compiled(state, b)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state, m = compiled(state, b)
    jax.block_until_ready(m['loss'])
    times.append(time.perf_counter() - t)
  med = float(np.median(times))
  return dict(
    model=model,
    image_size=size,
    batch=batch,
    dtype=dtype,
    remat=remat,
    compile_s=compile_s,
    median_ms=med * 1e3,
    images_per_sec=batch / med,
    peak_memory_bytes=peak,
  )


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--model', default='efficientdet-d0')
  p.add_argument('--size', type=int, default=512)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--dtype', default='float32,bfloat16')
  p.add_argument('--remat', default='false,true')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--format', choices=['table', 'json'], default='table')
  a = p.parse_args()
  rows = [
    bench(a.model, a.size, a.batch, dt, rm == 'true', a.repeats)
    for dt in a.dtype.split(',')
    for rm in a.remat.split(',')
  ]
  if a.format == 'json':
    print(json.dumps(rows))
    return
  print(f'device: {jax.devices()[0].platform}, 1 device')
  print(
    '| model | size | batch | dtype | remat | compile s | step ms '
    '| images/s | peak MiB |'
  )
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    mib = (
      'n/a'
      if r['peak_memory_bytes'] is None
      else (f'{r["peak_memory_bytes"] / 2**20:.0f}')
    )
    print(
      f'| {r["model"]} | {r["image_size"]} | {r["batch"]} | {r["dtype"]} '
      f'| {r["remat"]} | {r["compile_s"]:.1f} | {r["median_ms"]:.0f} '
      f'| {r["images_per_sec"]:.2f} | {mib} |'
    )


if __name__ == '__main__':
  main()
