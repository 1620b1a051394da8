"""Time to the first training step, cold and warm, phase by phase.

  python benchmarks/startup.py [--config=configs/d0.py] [--image=512]
      [--batch=8] [--repeats=1]

Runs `python -m effdet_jax.main --mode=train` for one step on synthetic
images (D0 at 512 px, batch 8 by default) with a fresh persistent
compilation cache (cold: every program compiled), then again with that
cache filled (warm), and prints the start-up line's phases (imports, setup,
init, data, compile, first step; times from process start) as a table.
Also times `effdet_jax.create_model` in a fresh process (a notebook's
first cell: imports plus fresh variables). The machine should be idle.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
_LINE = re.compile(r'start-up ([0-9.]+) s to step (\d+): (.*)')
_NOTEBOOK = """
import time
t0 = time.time()
import effdet_jax
t1 = time.time()
model, variables = effdet_jax.create_model({name!r})
t2 = time.time()
print(f'NOTEBOOK {{t1 - t0:.1f}} {{t2 - t1:.1f}}')
"""


def first_step(config: str, image: int, batch: int, cache: str, workdir: str):
  """(total seconds, {phase: seconds}) from one run's start-up line."""
  cmd = [
    sys.executable,
    '-m',
    'effdet_jax.main',
    f'--config={config}',
    f'--workdir={workdir}',
    '--mode=train',
    '--config.data.source=synthetic',
    f'--config.data.synthetic_image_size=({image},{image})',
    '--config.data.synthetic_num_classes=3',
    f'--config.model.image_size=({image},{image})',
    f'--config.train.batch_size={batch}',
    '--config.train.num_steps=1',
    '--config.eval.every_steps=0',
    f'--config.compilation_cache.dir={cache}',
  ]
  out = subprocess.run(
    cmd, cwd=REPO, capture_output=True, text=True, check=False
  )
  text = out.stdout + out.stderr
  match = _LINE.search(text)
  if out.returncode or not match:
    raise RuntimeError(f'run failed:\n{text[-3000:]}')
  phases = {}
  for part in match.group(3).split(', '):
    name, seconds = part.rsplit(' ', 1)
    phases[name] = float(seconds)
  return float(match.group(1)), phases


def notebook(name: str) -> tuple[float, float, float]:
  """(import s, create_model s, process wall s) in a fresh interpreter."""
  start = time.time()
  out = subprocess.run(
    [sys.executable, '-c', _NOTEBOOK.format(name=name)],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  )
  wall = time.time() - start
  imports, create = re.search(r'NOTEBOOK (\S+) (\S+)', out.stdout).groups()
  return float(imports), float(create), wall


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default='configs/d0.py')
  parser.add_argument('--model', default='efficientdet-d0')
  parser.add_argument('--image', type=int, default=512)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=1)
  args = parser.parse_args()

  rows = []
  for r in range(args.repeats):
    with tempfile.TemporaryDirectory() as tmp:
      cache = os.path.join(tmp, 'jax_cache')
      for kind in ('cold', 'warm'):
        workdir = os.path.join(tmp, f'{kind}-{r}')
        total, phases = first_step(
          args.config, args.image, args.batch, cache, workdir
        )
        rows.append((kind, total, phases))
  names = list(rows[0][2])
  print()
  print(
    f'time to first step: {args.config}, {args.image} px, batch '
    f'{args.batch}, synthetic data (seconds from process start)'
  )
  print()
  print('| cache | total | ' + ' | '.join(names) + ' |')
  print('|---|---|' + '---|' * len(names))
  for kind, total, phases in rows:
    cells = ' | '.join(f'{phases.get(n, 0):.1f}' for n in names)
    print(f'| {kind} | **{total:.1f}** | {cells} |')
  imports, create, wall = notebook(args.model)
  print()
  print(
    f'create_model({args.model!r}) in a fresh process: import effdet_jax '
    f'{imports:.1f} s, create_model {create:.1f} s (process {wall:.1f} s)'
  )


if __name__ == '__main__':
  main()
