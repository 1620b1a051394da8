"""BCCD benchmark: train a D0 on the blood-cell data for a fixed budget on
the CPU, report COCO AP on BCCD's validation split (not a test).

  python benchmarks/finetune_bccd.py [--workdir=/tmp/bccd_bench]
      [--data_dir=/tmp/bccd] [--steps=300] [--size=256] [--batch=8]
      [--init_from=CONVERTED_DIR]

Writes the VOC XML of ../shared/data/bccd into records + COCO jsons per
official split (`create_tfrecord --format=voc`, skipped when present), then
runs the same command a user would (`python -m effdet_jax.main
--config=configs/custom.py:bccd ...`, printed), from scratch unless
`--init_from` names a converted official checkpoint. Prints the wall time
(start-up, compile, training and evaluation; the machine may be shared)
and the final COCO metrics of the EMA weights on the 87 val images.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
BCCD = REPO.parent / 'shared' / 'data' / 'bccd'


def prepare(data_dir: str) -> None:
  """Records + json_<split>.json for train and val (once)."""
  os.makedirs(data_dir, exist_ok=True)
  label_map = os.path.join(data_dir, 'label_map.json')
  if not os.path.exists(label_map):
    with open(label_map, 'w') as f:
      json.dump({'1': 'RBC', '2': 'WBC', '3': 'Platelets'}, f)
  for split in ('train', 'val'):
    if os.path.exists(os.path.join(data_dir, f'json_{split}.json')):
      continue
    subprocess.run(
      [
        sys.executable,
        '-m',
        'effdet_jax.data.create_tfrecord',
        '--format=voc',
        f'--annotations={BCCD / "xml"}',
        f'--images={BCCD / "images"}',
        f'--split={BCCD / "splits" / f"{split}.txt"}',
        f'--label_map={label_map}',
        f'--output={os.path.join(data_dir, split)}',
        '--num_shards=4',
      ],
      check=True,
      cwd=REPO,
    )


def command(args) -> list[str]:
  d = args.data_dir
  flags = [
    '--config=configs/custom.py:bccd',
    f'--workdir={args.workdir}',
    f'--config.data.train_json={d}/json_train.json',
    f'--config.data.eval_json={d}/json_val.json',
    f'--config.data.train_images={BCCD / "images"}',
    f'--config.data.eval_images={BCCD / "images"}',
    f'--config.model.image_size=({args.size},{args.size})',
    f'--config.train.batch_size={args.batch}',
    f'--config.train.num_steps={args.steps}',
    '--config.train.lr_warmup_steps=50',
    # A few hundred steps: a constant rate, EMA does the averaging (the
    # official cosine would spend the last third near zero).
    '--config.train.lr_decay_method=constant',
    '--config.train.learning_rate=0.16',  # per 64 -> 0.02 at batch 8
    '--config.train.lr_warmup_init=0.016',
    '--config.train.moving_average_decay=0.998',
    '--config.train.log_every_steps=25',
    f'--config.checkpoint.every_steps={args.steps}',
    '--config.eval.batch_size=8',
  ]
  if args.init_from:
    flags.append(f'--config.init_from.path={args.init_from}')
  return [sys.executable, '-m', 'effdet_jax.main', *flags]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', default='/tmp/bccd_bench')
  p.add_argument('--data_dir', default='/tmp/bccd')
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--size', type=int, default=256)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--init_from', default='')
  args = p.parse_args()
  prepare(args.data_dir)
  if os.path.exists(args.workdir) and os.listdir(args.workdir):
    sys.exit(f'{args.workdir} is not empty (a run there would resume)')
  cmd = command(args)
  print('$ ' + shlex.join(cmd[2:]).replace(' --', ' \\\n    --'), flush=True)
  start = time.time()
  subprocess.run(cmd, check=True, cwd=REPO)
  wall = time.time() - start
  evals = pathlib.Path(args.workdir, 'eval').glob('step_*.json')
  last = max(evals, key=lambda p: int(p.stem.split('_')[1]))
  m = json.loads(last.read_text())
  print(f'\nwall {wall:.0f} s for {args.steps} steps ({os.cpu_count()} cores)')
  print(
    'COCO (val, 87 images, EMA): '
    + ', '.join(
      f'{k} {m[k]:.3f}' for k in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
    )
  )
  print(
    'per class AP: '
    + ', '.join(f'{k} {v:.3f}' for k, v in m['per_class'].items())
  )


if __name__ == '__main__':
  main()
