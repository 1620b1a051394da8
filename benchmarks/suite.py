"""Several `tools.benchmark` workloads in one process, one table.

  python benchmarks/suite.py [--config=configs/d0.py]
      [--workloads=forward:1:float32,forward:8:float32,train:8:float32]
      [--min_time_s=3] [--json=rows.jsonl]

Each workload is `mode:batch:dtype`. One process means one backend start
(on a GPU, one CUDA context and one autotuning cache) for all rows, which
is what makes a full table fit a short lease on an accelerator. Each row is
printed as soon as it is measured (and appended to `--json`), so a run cut
off by a time limit keeps the rows it finished. The table is the same as
`tools.benchmark`'s, with the device named above it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from effdet_jax import config_files  # noqa: E402
from effdet_jax.cpu import malloc_tuning  # noqa: E402
from effdet_jax.tools import benchmark as bm  # noqa: E402

DEFAULT = (
  'forward:1:float32,forward:8:float32,e2e:8:float32,train:8:float32,'
  'forward:8:bfloat16,train:8:bfloat16'
)


def parse_workloads(spec: str) -> list[tuple[str, int, str]]:
  """'mode:batch:dtype,...' -> [(mode, batch, dtype), ...], validated."""
  out = []
  for item in spec.split(','):
    parts = item.strip().split(':')
    if len(parts) != 3:
      raise ValueError(f'workload {item!r}: want mode:batch:dtype')
    mode, batch, dtype = parts
    if mode not in ('forward', 'train', 'e2e'):
      raise ValueError(f'workload {item!r}: mode is forward|train|e2e')
    if dtype not in ('float32', 'bfloat16'):
      raise ValueError(f'workload {item!r}: dtype is float32|bfloat16')
    out.append((mode, int(batch), dtype))
  return out


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--model', default='efficientdet-d0')
  p.add_argument('--workloads', default=DEFAULT)
  p.add_argument('--min_iters', type=int, default=10)
  p.add_argument('--min_time_s', type=float, default=3.0)
  p.add_argument('--json', default=None, help='append rows here (JSONL)')
  a = p.parse_args()
  workloads = parse_workloads(a.workloads)
  malloc_tuning.dispatch_inline()
  dev = jax.devices()[0]
  print(f'device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}')
  rows = []
  for i, (mode, batch, dtype) in enumerate(workloads):
    config = config_files.load_module('base').get_config(a.model)
    config.model.dtype = dtype
    t = time.perf_counter()
    row = bm.run(
      config,
      mode,
      batch,
      min_iters=a.min_iters,
      min_time_s=a.min_time_s,
      measure_peak=i == 0,
    )
    row['wall_s'] = time.perf_counter() - t
    if i == 0:
      print(
        f'f32 matmul peak: {row["matmul_peak_gflops"]:.0f} GFLOP/s '
        f'(default precision); {row["gmacs_per_image"]:.2f} GMAC per image',
        flush=True,
      )
    rows.append(row)
    print(json.dumps(row), flush=True)
    if a.json:
      with open(a.json, 'a') as f:
        f.write(json.dumps(row) + '\n')
  print(bm.format_table(rows), flush=True)


if __name__ == '__main__':
  malloc_tuning.reexec_if_untuned()
  main()
