"""Side by side: effdet_jax vs the `effdet` PyTorch package, same machine.

  python benchmarks/vs_effdet.py [--size=512] [--rounds=3]
      [--torch_compile=true] [--workloads=fwd1,fwd8,train8]

Workloads (D0, random weights, f32): network forward at batch 1 and 8, and
one training step at batch 8 (forward, target assignment, focal + box loss,
backward, SGD with momentum; ours also clips and updates the EMA, as our
trainer always does). effdet runs its `tf_efficientdet_d0` (the TF-ported
weights layout, same architecture) through `DetBenchTrain`, eager and, for
the forward, `torch.compile` (inductor). The implementations are run
interleaved, `--rounds` times each, so a machine-load change hits all of
them; each round times several calls and the table shows the median of
all calls and the ratio to effdet eager.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

from configs import base
from effdet_jax.tools import benchmark as bm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tests'))
import torch_ref  # noqa: E402  (test-only torchvision shim for effdet)


def _ours(workload: str, size: int):
  config = base.get_config('efficientdet-d0')
  config.model.image_size = (size, size)
  batch = 1 if workload == 'fwd1' else 8
  mode = 'train' if workload == 'train8' else 'forward'
  _, call, _ = bm._prepare(config, mode, batch)  # noqa: SLF001
  return call, lambda out: jax.block_until_ready(out)


def _effdet(workload: str, size: int, compiled: bool):
  import torch

  effdet = torch_ref.import_effdet()
  torch.manual_seed(0)
  config = effdet.get_efficientdet_config('tf_efficientdet_d0')
  config.image_size = (size, size)
  net = effdet.EfficientDet(config, pretrained_backbone=False)
  batch = 1 if workload == 'fwd1' else 8
  x = torch.randn(batch, 3, size, size)
  if workload != 'train8':
    net.eval()
    fn = torch.compile(net) if compiled else net

    def fwd():
      with torch.no_grad():
        return fn(x)

    return fwd, lambda out: None
  bench = effdet.DetBenchTrain(net, create_labeler=True)
  bench.train()
  opt = torch.optim.SGD(bench.parameters(), lr=0.01, momentum=0.9)
  # The same random boxes as our train workload (tools.benchmark).
  b = bm._random_batch(batch, (size, size), 90)  # noqa: SLF001
  target = {
    'bbox': torch.from_numpy(b['boxes']),
    'cls': torch.from_numpy(b['classes']).float(),
  }

  def step():
    opt.zero_grad(set_to_none=True)
    loss = bench(x, target)['loss']
    loss.backward()
    torch.nn.utils.clip_grad_norm_(bench.parameters(), 10.0)
    opt.step()
    return loss

  return step, lambda out: None


def _time(call, sync, n):
  out = []
  for _ in range(n):
    t = time.perf_counter()
    sync(call())
    out.append(time.perf_counter() - t)
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--size', type=int, default=512)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--calls', type=int, default=3, help='timed calls per round')
  p.add_argument('--torch_compile', default='true')
  p.add_argument('--workloads', default='fwd1,fwd8,train8')
  a = p.parse_args()
  import torch

  torch.set_num_threads(_cores())
  rows = []
  for w in a.workloads.split(','):
    impls = {
      'effdet_jax': _ours(w, a.size),
      'effdet eager': _effdet(w, a.size, False),
    }
    if a.torch_compile == 'true' and w != 'train8':
      impls['effdet torch.compile'] = _effdet(w, a.size, True)
    for k, (call, sync) in list(impls.items()):  # warm-up (compiles)
      try:
        sync(call())
        sync(call())
      except Exception as e:  # noqa: BLE001 - inductor needs a C++ compiler
        print(f'{k} failed: {e!r:.200}', file=sys.stderr)
        del impls[k]
    times = {k: [] for k in impls}
    for _ in range(a.rounds):
      for k, (call, sync) in impls.items():
        times[k] += _time(call, sync, a.calls)
    batch = 1 if w == 'fwd1' else 8
    ref = float(np.median(times['effdet eager']))
    for k, ts in times.items():
      med = float(np.median(ts))
      rows.append((w, k, med * 1e3, batch / med, ref / med))
    print(f'done {w}', file=sys.stderr, flush=True)
  print(f'machine: {_cores()} CPU threads, {jax.devices()[0].device_kind}')
  print(
    '| workload | implementation | median ms | images/s | vs effdet eager |'
  )
  print('|---|---|---|---|---|')
  names = {'fwd1': 'forward b1', 'fwd8': 'forward b8', 'train8': 'train b8'}
  for w, k, ms, ips, ratio in rows:
    print(f'| {names[w]} | {k} | {ms:.0f} | {ips:.2f} | {ratio:.2f}x |')


def _cores() -> int:
  import os

  return len(os.sched_getaffinity(0))


if __name__ == '__main__':
  main()
