"""Depthwise conv on this backend: XLA grouped conv, fused shifted MACs, and
the compiled XLA:CPU kernel (`effdet_jax/kernels`, CPU only).

  python benchmarks/depthwise.py [--format=json]

Prints median milliseconds (forward and forward+backward) per form.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from effdet_jax.cpu import malloc_tuning, native_depthwise
from effdet_jax.models.layers import depthwise_conv

CASES = [
  ((8, 128, 128, 96), 3, 1),
  ((8, 128, 128, 96), 5, 2),
  ((8, 64, 64, 240), 5, 1),
]


def _median_ms(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t) * 1e3)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--format', choices=['table', 'json'], default='table')
  args = parser.parse_args()
  rows = []
  impls = ['lax', 'shift'] + (
    ['native'] if native_depthwise.available() else []
  )
  for shape, k, s in CASES:
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    w = jax.random.normal(jax.random.PRNGKey(1), (k, k, shape[-1], 1))
    row = {'shape': list(shape), 'kernel': k, 'stride': s}
    for impl in impls:
      fwd = jax.jit(lambda x, w, impl=impl, s=s: depthwise_conv(x, w, s, impl))
      grad = jax.jit(
        jax.grad(
          lambda x, w, impl=impl, s=s: jnp.sum(
            depthwise_conv(x, w, s, impl) ** 2
          ),
          argnums=(0, 1),
        )
      )
      row[f'{impl}_fwd_ms'] = _median_ms(fwd, x, w)
      row[f'{impl}_grad_ms'] = _median_ms(grad, x, w)
    rows.append(row)
  if args.format == 'json':
    print(json.dumps({'backend': jax.default_backend(), 'rows': rows}))
    return
  print(f'backend: {jax.default_backend()} ({jax.devices()[0].device_kind})')
  cols = [f'{i} {p}' for p in ('fwd', 'grad') for i in impls]
  print('| input | k/s | ' + ' | '.join(f'{c} ms' for c in cols) + ' |')
  print('|---|---|' + '---|' * len(cols))
  for r in rows:
    vals = [r[f'{i}_{p}_ms'] for p in ('fwd', 'grad') for i in impls]
    cells = ' | '.join(f'{v:.1f}' for v in vals)
    print(f'| {r["shape"]} | {r["kernel"]}/{r["stride"]} | {cells} |')


if __name__ == '__main__':
  # The settings effdet_jax.main runs under (without them each call's
  # output is a fresh mmap that the kernel faults in page by page).
  malloc_tuning.reexec_if_untuned()
  malloc_tuning.dispatch_inline()
  main()
