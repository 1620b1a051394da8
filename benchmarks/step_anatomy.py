"""Where a training step's compile time goes: forward + backward vs the
update (optimizer, EMA, clipping, non-finite guard).

  python benchmarks/step_anatomy.py [--config=d0] [--image=512] [--batch=8]
      [--backend=auto]

Lowers and compiles, in one process and without a persistent cache, (a)
the loss and its gradients alone, (b) the whole step on a `TrainState`
(each parameter, accumulator, EMA and BN statistic its own buffer, so the
update's share grows with the number of variables, not the image size) and
(c) the whole step as the training loop runs it, on the packed state
(`effdet_jax/train/packed.py`: momentum and EMAs in flat buffers), with
XLA's default options and with the trainer's (`cpu/compile_options.py`
on a CPU), and
prints for each the trace + lowering time, the XLA compile time and the
number of fusions in the compiled program.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from effdet_jax.cpu import malloc_tuning


def _measure(fn, *args, options=None) -> tuple[float, float, int]:
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile(options or None)
  t2 = time.perf_counter()
  return t1 - t0, t2 - t1, (compiled.as_text() or '').count(' fusion(')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default='d0')
  parser.add_argument('--image', type=int, default=512)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--backend', default='auto')
  args = parser.parse_args()
  malloc_tuning.reexec_if_untuned(backend=args.backend)
  malloc_tuning.dispatch_inline(backend=args.backend)

  import jax  # noqa: PLC0415 - after the re-exec
  import jax.numpy as jnp  # noqa: PLC0415

  from effdet_jax import config_files, ops  # noqa: PLC0415
  from effdet_jax.detection import losses, targets  # noqa: PLC0415
  from effdet_jax.tools.benchmark import _random_batch  # noqa: PLC0415
  from effdet_jax.train import step_compile  # noqa: PLC0415
  from effdet_jax.train import trainer as trainer_lib  # noqa: PLC0415

  ops.set_backend(args.backend)
  config = config_files.load(args.config)
  config.model.image_size = (args.image, args.image)
  config.train.batch_size = args.batch
  config.train.num_steps = max(config.train.num_steps, 1000)
  config.mesh.data = 1
  tr = trainer_lib.Trainer(config, tempfile.mkdtemp(), jax.devices()[:1])
  batch = _random_batch(
    args.batch, (args.image, args.image), config.model.num_classes
  )
  batch = jax.device_put(batch, tr.batch_sharding(batch))
  batch['learning_rate'] = tr.learning_rate(0)
  state = tr.fresh_state()
  t = config.train
  loss_kw = losses.loss_kwargs(config)
  anchors = jnp.asarray(tr.anchors, jnp.float32)

  def loss_fn(params, batch_stats, batch):
    (cls, box), new_vars = tr.model.apply(
      {'params': params, 'batch_stats': batch_stats},
      batch['image'],
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': jax.random.PRNGKey(0)},
    )
    tg = targets.assign(
      anchors,
      batch['boxes'],
      batch['classes'],
      t.matched_threshold,
      t.unmatched_threshold,
    )
    loss, _ = losses.detection_loss(cls, box, tg, anchors=anchors, **loss_kw)
    return loss, new_vars

  grads = jax.jit(
    lambda s, b: jax.value_and_grad(loss_fn, has_aux=True)(
      s.params, s.batch_stats, b
    )
  )
  options = step_compile.step_compiler_options()
  rows = [
    ('loss + gradients', _measure(grads, state, batch)),
    ('whole step, TrainState', _measure(tr.step_fn(batch), state, batch)),
    (
      'whole step, packed, default options',
      _measure(tr.loop_step_fn(batch), tr.to_loop(state), batch),
    ),
    (
      "whole step, packed, the trainer's compile options",
      _measure(
        tr.loop_step_fn(batch), tr.to_loop(state), batch, options=options
      ),
    ),
  ]
  leaves = len(jax.tree.leaves(state.params))
  stats = len(jax.tree.leaves(state.batch_stats))
  print(
    f'\n{args.config} at {args.image} px, batch {args.batch}, backend '
    f'{ops.backend()}, {jax.devices()[0].platform}: {leaves} parameter and '
    f'{stats} BN-statistic leaves\n'
  )
  print('| program | trace + lower | compile | fusions |')
  print('|---|---|---|---|')
  for name, (lower_s, compile_s, fusions) in rows:
    print(f'| {name} | {lower_s:.1f} s | {compile_s:.1f} s | {fusions} |')
  print(f"\nthe trainer's compile options: {options or 'none (defaults)'}")
  sys.stdout.flush()


if __name__ == '__main__':
  main()
