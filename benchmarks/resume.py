"""Time to the first resumed step, at an early and a late step.

  python benchmarks/resume.py [--images=20480] [--steps=10,20000]
      [--batch=8] [--repeats=2] [--legacy]

Writes a COCO-sized synthetic TFRecord set with the project's own writer
(`data/create_tfrecord.write_shards` of `data/tfrecord_format.make_example`
records: 64x64 JPEG shapes, 1-4 boxes each; kept in --cache between runs),
then for each step S writes a checkpoint at S into a fresh workdir (the
input position a run that trained S steps would have saved) and times
`python -m effdet_jax.main --mode=train` resuming there, from process start
to the end of the first resumed step (its start-up line; the `data` phase
is the time to the first batch). A persistent compilation cache in --cache
is warmed first, so the rows differ only in what the resume costs.

--legacy adds rows for a checkpoint without an input position, resumed the
way such checkpoints are: the stream read from its start and S batches
dropped (every skipped image decoded and augmented).

With 20,480 images and batch 8, step 20,000 is 160,000 images in: offset
16,640 of epoch 7, so the late row also skips most of an epoch's records.
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

os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

REPO = pathlib.Path(__file__).resolve().parents[1]
_LINE = re.compile(r'start-up ([0-9.]+) s to step (\d+): (.*)')


def write_records(directory: pathlib.Path, images: int, shards: int) -> str:
  """`images` synthetic 64x64 JPEG records in `shards` files (reused)."""
  import tensorflow as tf

  from effdet_jax.data import create_tfrecord, synthetic, tfrecord_format

  pattern = str(directory / 'train-*.tfrecord')
  done = directory / f'done-{images}-{shards}'
  if done.exists():
    return pattern
  directory.mkdir(parents=True, exist_ok=True)

  def render(i):
    ex = synthetic.generate(
      i,
      seed=0,
      split='train',
      image_size=(64, 64),
      num_classes=3,
      max_objects=4,
    )
    return tf.io.encode_jpeg(ex['image']), ex['boxes'], ex['classes']

  def examples():
    ds = tf.data.Dataset.range(images).map(render, tf.data.AUTOTUNE)
    for i, (jpeg, boxes, classes) in enumerate(ds.as_numpy_iterator()):
      yield tfrecord_format.make_example(
        encoded=jpeg,
        image_format='jpeg',
        filename=f'{i}.jpg',
        source_id=str(i + 1),
        height=64,
        width=64,
        objects={
          'ymin': boxes[:, 0].tolist(),
          'xmin': boxes[:, 1].tolist(),
          'ymax': boxes[:, 2].tolist(),
          'xmax': boxes[:, 3].tolist(),
          'text': [b'shape'] * len(classes),
          'label': classes.tolist(),
        },
      )

  t = time.perf_counter()
  create_tfrecord.write_shards(examples(), str(directory / 'train'), shards)
  done.write_text('')
  print(f'wrote {images} records in {time.perf_counter() - t:.0f} s')
  return pattern


def run_config(pattern: str, batch: int, steps: int):
  """The benchmark's config: configs/demo.py:test reading the records."""
  from effdet_jax import config_files

  config = config_files.load_module('demo').get_config('test')
  d = config.data
  d.source, d.train_pattern, d.label_map = 'tfrecord', pattern, 'shapes'
  d.eval_pattern = pattern  # the final evaluation: 8 images
  config.eval.num_images, config.eval.draw_predictions = 8, 0
  config.train.batch_size = batch
  config.train.num_steps = steps
  config.checkpoint.every_steps = 10**9  # only the final save
  return config


def plant_checkpoint(config, workdir: str, step: int, images: int, legacy):
  """The checkpoint a run that trained `step` steps would have saved (a
  fresh state; the position after step*batch images, no bad records)."""
  from effdet_jax.data import position
  from effdet_jax.runtime import checkpoint
  from effdet_jax.train import trainer as trainer_lib

  trainer = trainer_lib.Trainer(config, workdir)
  state = trainer.fresh_state().replace(step=step)
  batch = int(config.train.batch_size)
  epoch, offset = divmod(step * batch, images)
  payload = position.to_payload([position.Position(epoch, offset)], batch)
  ckpt = checkpoint.Checkpointer(workdir, 1, 1, async_save=False)
  ckpt.save(step, state, force=True, data=None if legacy else lambda: payload)
  ckpt.close()
  trainer_lib.write_config(config, workdir)


def resume_seconds(config_path: str, workdir: str, step: int, cache_dir: str):
  """Runs the resume; (start-up seconds, phases) from its start-up line."""
  cmd = [
    sys.executable,
    '-m',
    'effdet_jax.main',
    f'--config={config_path}',
    f'--workdir={workdir}',
    '--mode=train',
    f'--config.train.num_steps={step + 1}',
  ]
  out = subprocess.run(
    cmd,
    cwd=REPO,
    env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir),
    capture_output=True,
    text=True,
    check=False,
  )
  text = out.stdout + out.stderr
  match = _LINE.search(text)
  if out.returncode or not match:
    raise RuntimeError(f'resume at {step} failed:\n{text[-3000:]}')
  return float(match.group(1)), match.group(3)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--images', type=int, default=20480)
  parser.add_argument('--shards', type=int, default=32)
  parser.add_argument('--steps', default='10,20000')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--legacy', action='store_true')
  parser.add_argument(
    '--cache', default=os.path.join(tempfile.gettempdir(), 'effdet_resume')
  )
  args = parser.parse_args()
  steps = [int(s) for s in args.steps.split(',')]
  cache = pathlib.Path(args.cache)
  pattern = write_records(cache / 'records', args.images, args.shards)

  rows = []
  kinds = [('position', False)] + (
    [('legacy skip', True)] if args.legacy else []
  )
  with tempfile.TemporaryDirectory() as tmp:
    # The CLI reads run_config through a config file.
    config_path = os.path.join(tmp, 'resume_config.py')
    with open(config_path, 'w') as f:
      f.write(
        _CONFIG_FILE.format(
          bench_dir=str(REPO / 'benchmarks'), pattern=pattern, batch=args.batch
        )
      )
    warm = True
    for kind, legacy in kinds:
      for step in steps:
        times, phases = [], ''
        for r in range(args.repeats + (1 if warm else 0)):
          workdir = os.path.join(tmp, f'w-{kind[0]}-{step}-{r}')
          config = run_config(pattern, args.batch, step + 1)
          plant_checkpoint(config, workdir, step, args.images, legacy)
          seconds, phases_r = resume_seconds(
            config_path, workdir, step, str(cache / 'jax_cache')
          )
          if warm:  # the first run fills the compilation cache
            warm = False
            continue
          times.append(seconds)
          phases = phases_r
        rows.append((kind, step, min(times), phases))

  print()
  print(
    f'resume: {args.images} records, batch {args.batch}, best of '
    f'{args.repeats}, warm compilation cache'
  )
  print(f'{"input position":16s} {"step":>7s} {"to 1st step s":>14s}  phases')
  for kind, step, seconds, phases in rows:
    print(f'{kind:16s} {step:7d} {seconds:14.1f}  {phases}')
  first = {kind: (s, p) for kind, step, s, p in rows if step == steps[0]}
  for kind, step, seconds, phases in rows:
    if step != steps[0]:
      ratio = seconds / first[kind][0]
      data = _phase(phases, 'data') / _phase(first[kind][1], 'data')
      print(
        f'{kind}: step {step} / step {steps[0]} = {ratio:.2f}x to the '
        f'first step, {data:.2f}x in the data phase'
      )


def _phase(phases: str, name: str) -> float:
  return float(re.search(rf'{name} ([0-9.]+)', phases).group(1))


_CONFIG_FILE = """
import sys

sys.path.insert(0, {bench_dir!r})
import resume


def get_config():  # num_steps comes from the command line
  return resume.run_config({pattern!r}, {batch}, 1)
"""


if __name__ == '__main__':
  main()
