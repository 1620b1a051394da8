"""XLA compile time per model (ahead of time, nothing runs), as a table.

  python benchmarks/compile_times.py [--models=efficientdet-d0,...]
      [--train_models=efficientdet-d0] [--batch=1]

For each model: the inference forward at its native image size, batch
`--batch` (`jit(apply).lower(abstract variables, abstract images)
.compile()`); for `--train_models`, the trainer's full training step too
(batch 8 for the issue's D0 target). Each row is compiled in a fresh
process so XLA's in-memory caches do not carry over; the persistent
compilation cache is off.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

_MARK = 'COMPILE_TIME '
_ALL = ','.join([f'efficientdet-d{i}' for i in range(8)] + ['efficientdet-d7x'])


def _one(name: str, mode: str, batch: int) -> dict:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from effdet_jax import api  # noqa: PLC0415

  cfg = api.model_config(name)
  if mode == 'forward':
    model = api.build_model(cfg)
    abstract = jax.eval_shape(lambda: api.init_variables(model))
    x = jax.ShapeDtypeStruct((batch, *cfg.image_size, 3), jnp.float32)
    fn = jax.jit(lambda v, im: model.apply(v, im, train=False))
    t = time.perf_counter()
    fn.lower(abstract, x).compile()
    return {'compile_s': time.perf_counter() - t, 'image': cfg.image_size}
  from effdet_jax import config_files  # noqa: PLC0415
  from effdet_jax.tools import benchmark  # noqa: PLC0415

  config = config_files.load_module('base').get_config(name)
  _, _, compile_s = benchmark._prepare(config, 'train', batch)  # noqa: SLF001
  return {'compile_s': compile_s, 'image': cfg.image_size}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--models', default=_ALL)
  p.add_argument('--train_models', default='efficientdet-d0')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--train_batch', type=int, default=8)
  p.add_argument('--one', default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.one:
    name, mode, batch = a.one.split(':')
    print(_MARK + json.dumps(_one(name, mode, int(batch))), flush=True)
    return
  jobs = [(m, 'forward', a.batch) for m in a.models.split(',') if m]
  jobs += [(m, 'train', a.train_batch) for m in a.train_models.split(',') if m]
  print('| model | image | program | batch | compile s |')
  print('|---|---|---|---|---|')
  for name, mode, batch in jobs:
    out = subprocess.run(
      [sys.executable, __file__, f'--one={name}:{mode}:{batch}'],
      capture_output=True,
      text=True,
      check=False,
      cwd=tempfile.gettempdir(),
    )
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith(_MARK)]
    if not rows:
      print(f'| {name} | | {mode} | {batch} | failed: {out.stderr[-300:]!r} |')
      continue
    r = json.loads(rows[0][len(_MARK) :])
    size = 'x'.join(str(s) for s in r['image'])
    print(f'| {name} | {size} | {mode} | {batch} | {r["compile_s"]:.1f} |')
    sys.stdout.flush()


if __name__ == '__main__':
  main()
