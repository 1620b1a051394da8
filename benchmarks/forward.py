"""Forward-pass benchmark: compile time and images/s of a model.

  python benchmarks/forward.py [--model=efficientdet-d0] [--size=512]
      [--batch=1,8] [--dtype=float32] [--repeats=5] [--format=table|json]

Random normalised input (as the official `bm` network-latency mode): from
the first conv to the class/box outputs; no pre/post-processing.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import effdet_jax


def bench(model_name, size, batch, dtype, repeats, impl='auto'):
  model, variables = effdet_jax.create_model(
    model_name, dtype=dtype, depthwise_impl=impl
  )
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3))
  fn = jax.jit(model.apply)
  t = time.perf_counter()
  compiled = fn.lower(variables, x).compile()
  compile_s = time.perf_counter() - t
  jax.block_until_ready(compiled(variables, x))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(compiled(variables, x))
    times.append(time.perf_counter() - t)
  median = float(np.median(times))
  mem = None
  try:
    stats = jax.devices()[0].memory_stats() or {}
    mem = stats.get('peak_bytes_in_use')
  except Exception:  # noqa: BLE001 - CPU has no memory stats
    pass
  return {
    'model': model_name,
    'image_size': size,
    'batch': batch,
    'dtype': dtype,
    'depthwise_impl': impl,
    'compile_s': compile_s,
    'median_ms': median * 1e3,
    'images_per_sec': batch / median,
    'peak_memory_bytes': mem,
  }


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--model', default='efficientdet-d0')
  p.add_argument('--size', type=int, default=512)
  p.add_argument('--batch', default='1,8')
  p.add_argument('--dtype', default='float32')
  p.add_argument('--impl', default='auto')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--format', choices=['table', 'json'], default='table')
  a = p.parse_args()
  rows = [
    bench(a.model, a.size, int(b), a.dtype, a.repeats, a.impl)
    for b in a.batch.split(',')
  ]
  if a.format == 'json':
    print(json.dumps(rows if len(rows) > 1 else rows[0]))
    return
  dev = jax.devices()[0]
  print(
    f'device: {dev.platform} ({dev.device_kind}), '
    f'{jax.device_count()} device(s)'
  )
  print(
    '| model | size | batch | dtype | depthwise '
    '| compile s | median ms | images/s |'
  )
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(
      f'| {r["model"]} | {r["image_size"]} | {r["batch"]} | {r["dtype"]} '
      f'| {r["depthwise_impl"]} | {r["compile_s"]:.1f} '
      f'| {r["median_ms"]:.1f} | {r["images_per_sec"]:.2f} |'
    )


if __name__ == '__main__':
  main()
