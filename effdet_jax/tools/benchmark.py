"""Benchmark mode (the official `model_inspect --runmode=bm`).

  python -m effdet_jax.tools.benchmark --config=configs/d0.py \\
      --mode=forward|train|e2e --batch_size=8 [--dtype=float32|bfloat16] \\
      [--remat=false|true] [--backend=auto|xla|cpu] [--format=table|json] \\
      [--min_time_s=10]

* forward: the network only (normalised images in, class/box maps out).
* train: one full jitted training step (forward, on-device target
  assignment, loss, gradients, clipping, SGD, EMA) on random images with
  random boxes, through the trainer's own step function.
* e2e: preprocessed images in, detections out (network + the configured
  post-processing and NMS).

Compile time is measured separately (ahead-of-time `lower().compile()`);
then one warm-up call, then calls until both `--min_iters` and
`--min_time_s` are reached; the median is reported. The machine's f32
matmul peak is measured too, so the forward time is put next to its
physical limit (multiply-adds x 2 / peak FLOP/s).

`--backend` picks the `effdet_jax.ops` backend (default: as `main.py`,
$EFFDET_JAX_BACKEND else auto): `--backend=xla` on a CPU times the plain
forms TPUs and GPUs run, `cpu` the XLA:CPU kernels. Several workloads in
one process, one table: `benchmarks/suite.py`.
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from effdet_jax import api, config_files, inference, ops
from effdet_jax.cpu import malloc_tuning
from effdet_jax.detection import anchors as anchors_lib
from effdet_jax.tools import flops as flops_lib


def _define_flags() -> None:
  """The program's flags; defined only when it runs as a program (absl
  flags are process-global: importing two tools into one process must not
  define --config twice)."""
  config_flags.DEFINE_config_file(
    'config',
    str(config_files.DEFAULT_CONFIG_DIR / 'd0.py'),
    'Run config.',
    lock_config=True,
  )
  flags.DEFINE_enum('mode', 'forward', ['forward', 'train', 'e2e'], '')
  flags.DEFINE_integer('batch_size', 1, 'Images per call.')
  flags.DEFINE_enum(
    'dtype', None, ['float32', 'bfloat16'], 'Compute dtype (default: config).'
  )
  flags.DEFINE_bool('remat', None, 'train: remat (default: config).')
  flags.DEFINE_enum(
    'backend',
    None,
    list(ops.BACKENDS),
    f'effdet_jax.ops backend (default: ${ops.ENV_VAR}, else auto).',
  )
  flags.DEFINE_enum('format', 'table', ['table', 'json'], '')
  flags.DEFINE_integer('min_iters', 5, 'Timed calls, at least.')
  flags.DEFINE_float('min_time_s', 10.0, 'Timed seconds, at least.')
  flags.DEFINE_bool('measure_peak', True, 'Measure f32 matmul peak.')


def matmul_peak_flops(n: int = 2048, repeats: int = 20) -> float:
  """Measured f32 matmul FLOP/s of the default device: the fastest of
  `repeats` calls. A peak is what the machine can do; a busy neighbour
  only slows calls down (a median of 10 read 105 GFLOP/s in one run, 215 in
  the next), and the physical limit must not move with it."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
  jax.block_until_ready(f(a, a))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(a, a))
    times.append(time.perf_counter() - t)
  return 2.0 * n**3 / min(times)


def _random_batch(batch: int, size: tuple[int, int], num_classes: int):
  rng = np.random.default_rng(0)
  h, w = size
  boxes = np.zeros((batch, 100, 4), np.float32)
  classes = -np.ones((batch, 100), np.int32)
  yx = rng.uniform(0, 0.7, (batch, 8, 2)) * (h, w)
  hw = rng.uniform(0.05, 0.3, (batch, 8, 2)) * (h, w)
  boxes[:, :8] = np.concatenate([yx, yx + hw], -1)
  classes[:, :8] = rng.integers(1, num_classes + 1, (batch, 8))
  image = rng.normal(size=(batch, h, w, 3)).astype(np.float32)
  return {'image': image, 'boxes': boxes, 'classes': classes}


def _peak_bytes(compiled: Any) -> int | None:
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return int(
    mem.temp_size_in_bytes
    + mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
  )


def _time_calls(call, min_iters: int, min_time_s: float) -> list[float]:
  jax.block_until_ready(call())  # warm-up (first-call allocations)
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < min_iters or time.perf_counter() - start < min_time_s:
    t = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t)
  return times


def _prepare(config: Any, mode: str, batch: int):
  """(compiled, call, compile_s) for one workload; `call()` runs one
  timed call; compile_s is the XLA compile (lower + compile) alone."""
  size = tuple(config.model.image_size)
  if mode == 'train':
    from effdet_jax.train import step_compile
    from effdet_jax.train import trainer as trainer_lib

    config.train.batch_size = batch
    config.train.num_steps = max(config.train.num_steps, 1000)
    config.mesh.data = 1
    tr = trainer_lib.Trainer(config, tempfile.mkdtemp(), jax.devices()[:1])
    b = _random_batch(batch, size, config.model.num_classes)
    b = jax.device_put(b, tr.batch_sharding(b))
    # The step as the training loop runs it (train/packed.py), with its
    # compile options (train/step_compile.py).
    state = tr.to_loop(tr.fresh_state())
    t = time.perf_counter()
    compiled = (
      tr.loop_step_fn(b)
      .lower(state, b)
      .compile(step_compile.step_compiler_options() or None)
    )
    box = {'state': state, 'compile_s': time.perf_counter() - t}

    def call():
      box['state'], metrics = compiled(box['state'], b)
      return metrics['loss']

    return compiled, call, box['compile_s']
  model = api.build_model(config.model)
  variables = api.init_variables(model)
  images = jax.random.normal(jax.random.PRNGKey(0), (batch, *size, 3))
  if mode == 'forward':
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    t = time.perf_counter()
    compiled = fn.lower(variables, images).compile()
    compile_s = time.perf_counter() - t
    return compiled, lambda: compiled(variables, images), compile_s
  anchors = anchors_lib.anchors_from_config(config.model)
  kwargs = inference.inference_postprocess_kwargs(config.model)
  detect = jax.jit(inference.make_detect_fn(model, anchors, **kwargs))
  scale = jnp.ones((batch,), jnp.float32)
  t = time.perf_counter()
  compiled = detect.lower(variables, images, scale).compile()
  compile_s = time.perf_counter() - t
  return compiled, lambda: compiled(variables, images, scale), compile_s


def run(
  config: Any,
  mode: str,
  batch: int,
  *,
  min_iters: int = 5,
  min_time_s: float = 10.0,
  measure_peak: bool = True,
  backend: str | None = None,
) -> dict[str, Any]:
  """Benchmarks one workload; returns the row the CLI prints.

  `backend` ('auto', 'xla', 'cpu') runs it under that `effdet_jax.ops`
  backend; None: the process's (`ops.backend()`).
  """
  if backend is None:
    used = ops.backend()
    compiled, call, compile_s = _prepare(config, mode, batch)
    times = _time_calls(call, min_iters, min_time_s)
  else:
    with ops.use_backend(backend) as used:
      compiled, call, compile_s = _prepare(config, mode, batch)
      times = _time_calls(call, min_iters, min_time_s)
  median = float(np.median(times))
  row: dict[str, Any] = {
    'model': config.model.name,
    'mode': mode,
    'image_size': list(config.model.image_size),
    'batch_size': batch,
    'dtype': config.model.dtype,
    'remat': bool(config.train.remat) if mode == 'train' else None,
    'backend': used,
    'device': jax.devices()[0].device_kind,
    'compile_s': compile_s,
    'iterations': len(times),
    'median_ms': median * 1e3,
    'min_ms': min(times) * 1e3,
    'max_ms': max(times) * 1e3,
    'images_per_sec': batch / median,
    'peak_memory_bytes': _peak_bytes(compiled),
  }
  if measure_peak:
    peak = matmul_peak_flops()
    # Counted on the plain forms (`count_flops` traces with the 'xla'
    # backend): no custom call hides arithmetic from the jaxpr walk.
    model = api.build_model(config.model)
    x = jax.ShapeDtypeStruct((1, *config.model.image_size, 3), jnp.float32)
    abstract = api.abstract_variables(model)
    macs = flops_lib.count_flops(
      lambda v, im: model.apply(v, im, train=False), abstract, x
    )
    # Training is ~3x the forward's arithmetic (forward + two gradients).
    factor = 3 if mode == 'train' else 1
    limit_s = factor * batch * 2 * macs / peak
    row.update(
      matmul_peak_gflops=peak / 1e9,
      gmacs_per_image=macs / 1e9,
      physical_limit_ms=limit_s * 1e3,
      ratio_to_limit=median / limit_s,
    )
  return row


def format_table(rows: list[dict[str, Any]]) -> str:
  """Markdown table of benchmark rows."""
  cols = [
    ('model', '{}'),
    ('mode', '{}'),
    ('batch_size', '{}'),
    ('dtype', '{}'),
    ('backend', '{}'),
    ('compile_s', '{:.1f}'),
    ('median_ms', '{:.1f}'),
    ('images_per_sec', '{:.2f}'),
    ('peak_memory_bytes', '{}'),
    ('physical_limit_ms', '{:.1f}'),
    ('ratio_to_limit', '{:.2f}'),
  ]
  lines = [
    '| ' + ' | '.join(c for c, _ in cols) + ' |',
    '|' + '---|' * len(cols),
  ]
  for r in rows:
    cells = []
    for c, fmt in cols:
      v = r.get(c)
      if c == 'peak_memory_bytes' and v is not None:
        v, fmt = v / 2**20, '{:.0f} MiB'
      cells.append('n/a' if v is None else fmt.format(v))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  # Both before any JAX backend starts, where the 'cpu' backend computes.
  malloc_tuning.reexec_if_untuned(backend=f.backend)
  malloc_tuning.dispatch_inline(backend=f.backend)
  ops.set_backend(f.backend)
  with config.unlocked():
    if f.dtype:
      config.model.dtype = f.dtype
    if f.remat is not None:
      config.train.remat = f.remat
  row = run(
    config,
    f.mode,
    f.batch_size,
    min_iters=f.min_iters,
    min_time_s=f.min_time_s,
    measure_peak=f.measure_peak,
  )
  if f.format == 'json':
    print(json.dumps(row))
    return
  print(
    f'device: {row["device"]}, {jax.device_count()} device(s), '
    f'backend {row["backend"]}'
  )
  if 'matmul_peak_gflops' in row:
    print(
      f'f32 matmul peak: {row["matmul_peak_gflops"]:.0f} GFLOP/s; '
      f'{row["gmacs_per_image"]:.2f} GMAC per image'
    )
  print(format_table([row]))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
