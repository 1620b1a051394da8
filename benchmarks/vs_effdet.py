"""Side by side: effdet_jax vs the `effdet` PyTorch package, same machine.

  python benchmarks/vs_effdet.py [--size=512] [--rounds=3]
      [--torch_compile=true] [--workloads=fwd1,fwd8,train8]
      [--torch_device=cpu|cuda]

Workloads (D0, random weights, f32): network forward at batch 1 and 8, and
one training step at batch 8 (forward, target assignment, focal + box loss,
backward, SGD with momentum; ours also clips and updates the EMA, as our
trainer always does). effdet runs its `tf_efficientdet_d0` (the TF-ported
weights layout, same architecture) through `DetBenchTrain`, eager and, for
the forward, `torch.compile` (inductor). Each implementation runs in its
own process, the processes alternating `--rounds` times, so a change of
machine load hits all of them; each round times several calls and the
table shows the median of all calls and the ratio to effdet eager. The
parent re-executes itself with `effdet_jax.cpu.malloc_tuning`'s glibc
tunables (as `effdet_jax.main` does), and the workers inherit them: both
implementations run under the same allocator settings
(`EFFDET_TUNE_MALLOC=0` compares under glibc's defaults).

On a GPU machine JAX takes the GPU by itself; `--torch_device=cuda` puts
effdet there too (each timed call then ends with `torch.cuda.synchronize`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from effdet_jax import config_files
from effdet_jax.cpu import malloc_tuning
from effdet_jax.tools import benchmark as bm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tests'))
import torch_ref  # noqa: E402  (test-only torchvision shim for effdet)

_CACHE = os.path.join(tempfile.gettempdir(), 'effdet_jax_vs_effdet_cache')


def _ours(workload: str, size: int):
  config = config_files.load_module('base').get_config('efficientdet-d0')
  config.model.image_size = (size, size)
  batch = 1 if workload == 'fwd1' else 8
  mode = 'train' if workload == 'train8' else 'forward'
  _, call, _ = bm._prepare(config, mode, batch)  # noqa: SLF001
  return call, lambda out: jax.block_until_ready(out)


def _effdet(workload: str, size: int, compiled: bool, device: str):
  import torch

  effdet = torch_ref.import_effdet()
  torch.manual_seed(0)
  config = effdet.get_efficientdet_config('tf_efficientdet_d0')
  config.image_size = (size, size)
  net = effdet.EfficientDet(config, pretrained_backbone=False).to(device)
  batch = 1 if workload == 'fwd1' else 8
  x = torch.randn(batch, 3, size, size, device=device)

  def sync(out):
    del out
    if device != 'cpu':
      torch.cuda.synchronize()

  if workload != 'train8':
    net.eval()
    fn = torch.compile(net) if compiled else net

    def fwd():
      with torch.no_grad():
        return fn(x)

    return fwd, sync
  bench = effdet.DetBenchTrain(net, create_labeler=True).to(device)
  bench.train()
  opt = torch.optim.SGD(bench.parameters(), lr=0.01, momentum=0.9)
  # The same random boxes as our train workload (tools.benchmark).
  b = bm._random_batch(batch, (size, size), 90)  # noqa: SLF001
  target = {
    'bbox': torch.from_numpy(b['boxes']).to(device),
    'cls': torch.from_numpy(b['classes']).float().to(device),
  }

  def step():
    opt.zero_grad(set_to_none=True)
    loss = bench(x, target)['loss']
    loss.backward()
    torch.nn.utils.clip_grad_norm_(bench.parameters(), 10.0)
    opt.step()
    return loss

  return step, sync


def _time(call, sync, n):
  out = []
  for _ in range(n):
    t = time.perf_counter()
    sync(call())
    out.append(time.perf_counter() - t)
  return out


IMPLS = ('effdet_jax', 'effdet eager', 'effdet torch.compile')
_NAMES = {'fwd1': 'forward b1', 'fwd8': 'forward b8', 'train8': 'train b8'}
_MARK = 'VS_EFFDET_TIMES '


def _worker(
  impl: str, workloads: list[str], size: int, calls: int, device: str
) -> None:
  """One implementation in this process: warm up, time, print JSON."""
  import torch

  torch.set_num_threads(_cores())
  if impl == 'effdet_jax':
    malloc_tuning.dispatch_inline()  # as effdet_jax.main does
    # Later rounds reuse the XLA executables instead of recompiling.
    jax.config.update('jax_compilation_cache_dir', _CACHE)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  times = {}
  for w in workloads:
    if impl == 'effdet_jax':
      call, sync = _ours(w, size)
    else:
      call, sync = _effdet(w, size, impl == 'effdet torch.compile', device)
    try:
      sync(call())
      sync(call())
    except Exception as e:  # noqa: BLE001 - inductor needs a C++ compiler
      print(f'{impl} {w} failed: {e!r:.200}', file=sys.stderr)
      continue
    times[w] = _time(call, sync, calls)
  if impl == 'effdet_jax':  # the parent starts no backend of its own
    times['device'] = jax.devices()[0].device_kind
  print(_MARK + json.dumps(times), flush=True)


def _run_worker(impl, workloads, a) -> dict[str, list[float]]:
  cmd = [
    sys.executable,
    __file__,
    f'--worker={impl}',
    f'--workloads={",".join(workloads)}',
    f'--size={a.size}',
    f'--calls={a.calls}',
    f'--torch_device={a.torch_device}',
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  for line in out.stdout.splitlines():
    if line.startswith(_MARK):
      return json.loads(line[len(_MARK) :])
  print(f'{impl} failed:\n{out.stderr[-2000:]}', file=sys.stderr)
  return {}


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--size', type=int, default=512)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--calls', type=int, default=3, help='timed calls per round')
  p.add_argument('--torch_compile', default='true')
  p.add_argument('--workloads', default='fwd1,fwd8,train8')
  p.add_argument('--torch_device', default='cpu', choices=['cpu', 'cuda'])
  p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  workloads = a.workloads.split(',')
  if a.worker:
    _worker(a.worker, workloads, a.size, a.calls, a.torch_device)
    return
  # Each implementation runs in its own process (same environment, the
  # same malloc tunables), so one's heap and thread pools cannot slow the
  # other; the processes alternate, `rounds` times, so a change of machine
  # load hits all of them.
  impls = list(IMPLS if a.torch_compile == 'true' else IMPLS[:2])
  times: dict[tuple[str, str], list[float]] = {}
  for r in range(a.rounds):
    for impl in impls:
      wl = [w for w in workloads if impl != IMPLS[2] or w != 'train8']
      got = _run_worker(impl, wl, a)
      a.jax_device = got.pop('device', getattr(a, 'jax_device', '?'))
      for w, ts in got.items():
        times.setdefault((w, impl), []).extend(ts)
    print(f'round {r + 1}/{a.rounds} done', file=sys.stderr, flush=True)
    if r + 1 < a.rounds:  # a run cut off by a time limit keeps a table
      _print_table(times, impls, workloads, a, file=sys.stderr)
  _print_table(times, impls, workloads, a, file=sys.stdout)


def _print_table(times, impls, workloads, a, file) -> None:
  def out(line):
    print(line, file=file, flush=True)

  out(
    f'machine: {_cores()} CPU threads; JAX on {a.jax_device}'
    f'; effdet on {a.torch_device}'
  )
  out(f'GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")}')
  out('| workload | implementation | median ms | images/s | vs effdet eager |')
  out('|---|---|---|---|---|')
  for w in workloads:
    batch = 1 if w == 'fwd1' else 8
    ref = times.get((w, IMPLS[1]))
    for impl in impls:
      ts = times.get((w, impl))
      if not ts:
        continue
      med = float(np.median(ts))
      ratio = f'{float(np.median(ref)) / med:.2f}x' if ref else 'n/a'
      out(
        f'| {_NAMES[w]} | {impl} | {med * 1e3:.0f} | {batch / med:.2f} |'
        f' {ratio} |'
      )


def _cores() -> int:
  return len(os.sched_getaffinity(0))


if __name__ == '__main__':
  # The settings `effdet_jax.main` runs under.
  malloc_tuning.reexec_if_untuned()
  main()
