"""Per-device memory of the training step on a mesh, before renting one.

  python -m effdet_jax.tools.plan_memory --config=configs/d7x.py \
      --mesh=data:4,spatial:4 --per_device_batch=1 [--remat=true] \
      [--target=auto|tpu|cpu] [--tpu=v3|v4|v5e|v5p] [--format=text|json]

Compiles the real training step (`Trainer.loop_step_fn`: forward, targets,
loss, gradients, optimizer, EMA; donated state) ahead of time on abstract
`ShapeDtypeStruct`s with the run's shardings (no array is allocated) and
reads XLA's memory analysis of one device.

Targets:
  tpu  a compile-only TPU topology (`jax.experimental.topologies`) from
       `libtpu`: the TPU compiler itself, no TPU needed. libtpu comes from
       the `tpu` extra, `pip install -e '.[tpu]'` (the version jax[tpu]
       pins), or `TPU_LIBRARY_PATH`; not a default dependency.
  cpu  fake CPU devices of the mesh size (`jax_num_cpu_devices`): XLA:CPU's
       buffer assignment, an approximation of TPU memory (no tile padding,
       other fusions; see README).
  auto tpu when libtpu is found and its topology compiles, else cpu.

`--per_device_batch` is images per `data` shard: the global batch is
`per_device_batch * data`, and each image is split over the `spatial`
devices along its height. The model dtype and remat come from the config
(`--config.model.dtype=...`, `--remat` overrides `train.remat`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import tempfile
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

# HBM per JAX device (a v3 core; a v4 / v5p megacore chip; a v5e chip).
DEVICE_MEMORY_GIB = {'v3': 16, 'v4': 32, 'v5e': 16, 'v5p': 95}
# Peak dense bf16 TFLOP/s per JAX device (a v3 core: half of a chip's 123;
# a v4 / v5p megacore chip; a v5e chip). f32 convolutions and matmuls run
# on the same units at XLA:TPU's default precision (bf16 passes).
PEAK_TFLOPS = {'v3': 61.5, 'v4': 275.0, 'v5e': 197.0, 'v5p': 459.0}
# The fraction of peak `implied_speed` assumes.
IMPLIED_UTILISATION = 0.5
# TPU generation -> (JAX devices per chip, topology dimensions, chip config).
_TPU = {
  'v3': (2, 2, None),
  'v4': (1, 3, 'megacore'),
  'v5e': (1, 2, None),
  'v5p': (1, 3, 'megacore'),
}


def _define_flags() -> None:
  """The program's flags; defined only when it runs as a program (absl
  flags are process-global: importing two tools into one process must not
  define --config twice)."""
  config_flags.DEFINE_config_file(
    'config', None, 'Run config file (configs/*.py).', lock_config=True
  )
  flags.DEFINE_string(
    'mesh', 'data:1,spatial:1', 'Mesh sizes, e.g. data:4,spatial:2.'
  )
  flags.DEFINE_integer(
    'per_device_batch', 1, 'Images per data shard (global = this x data).'
  )
  flags.DEFINE_bool('remat', None, 'Overrides train.remat.')
  flags.DEFINE_enum(
    'target', 'auto', ['auto', 'tpu', 'cpu'], 'Compiler to ask (see doc).'
  )
  flags.DEFINE_enum(
    'tpu', 'v3', sorted(_TPU), 'TPU generation of the compile-only topology.'
  )
  flags.DEFINE_float(
    'headroom', 0.95, 'Usable fraction of device memory for the verdict.'
  )
  flags.DEFINE_enum('format', 'text', ['text', 'json'], 'Output.')
  flags.mark_flags_as_required(['config'])


def parse_mesh(text: str) -> tuple[int, int]:
  """'data:4,spatial:2' -> (4, 2); a missing axis is 1."""
  sizes = {'data': 1, 'spatial': 1}
  for part in filter(None, text.split(',')):
    name, _, value = part.partition(':')
    if name.strip() not in sizes or not value.strip().isdigit():
      raise ValueError(f'bad --mesh part {part!r}: use data:N,spatial:S')
    sizes[name.strip()] = int(value)
  return sizes['data'], sizes['spatial']


def libtpu_path() -> str | None:
  """`TPU_LIBRARY_PATH`, else the `libtpu` package's libtpu.so, else None."""
  path = os.environ.get('TPU_LIBRARY_PATH')
  if path and os.path.exists(path):
    return path
  spec = importlib.util.find_spec('libtpu')
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], 'libtpu.so')
  return path if os.path.exists(path) else None


def topology_name(gen: str, num_devices: int) -> str:
  """Smallest power-of-two slice of `gen` with >= num_devices devices."""
  per_chip, dims, _ = _TPU[gen]
  chips = max(4, 2 ** math.ceil(math.log2(max(1, -(-num_devices // per_chip)))))
  shape = [2, 2] + [1] * (dims - 2)
  while math.prod(shape) < chips:  # double the smallest axis, last first
    shape[min(range(dims), key=lambda d: (shape[d], -d))] *= 2
  return f'{gen}:' + 'x'.join(str(s) for s in shape)


def tpu_devices(gen: str, num_devices: int) -> list:
  """Compile-only TPU devices (no TPU needed) of the smallest slice."""
  path = libtpu_path()
  if path is None:
    raise RuntimeError('libtpu not found (pip install libtpu)')
  os.environ['TPU_LIBRARY_PATH'] = path
  # Compile-only: no TPU host to discover; say so instead of probing.
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', f'{gen}-8')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  from jax.experimental import topologies  # noqa: PLC0415

  _, dims, chip_config = _TPU[gen]
  kwargs = {}
  if chip_config:
    kwargs = dict(
      chip_config_name=chip_config,
      chips_per_host_bounds=(2, 2, 1),
      num_slices=1,
    )
  topo = topologies.get_topology_desc(
    platform='tpu', topology_name=topology_name(gen, num_devices), **kwargs
  )
  return list(topo.devices)[:num_devices]


def cpu_devices(num_devices: int) -> list:
  """`num_devices` CPU devices (set before the backend starts, if it has
  not; a running backend must already have enough)."""
  import jax  # noqa: PLC0415

  try:
    jax.config.update('jax_num_cpu_devices', num_devices)
  except RuntimeError:  # backend already initialised: use what it has
    pass
  devices = jax.devices('cpu')
  if len(devices) < num_devices:
    raise RuntimeError(
      f'{len(devices)} CPU devices, the mesh needs {num_devices}: run in a '
      'fresh process'
    )
  return devices[:num_devices]


def abstract_batch(config: Any, global_batch: int) -> dict:
  """ShapeDtypeStructs of one global training batch (image, boxes, classes)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from effdet_jax import registry  # noqa: PLC0415

  h, w = registry.parse_image_size(config.model.image_size)
  m = int(config.data.max_instances_per_image)
  return {
    'image': jax.ShapeDtypeStruct((global_batch, h, w, 3), jnp.float32),
    'boxes': jax.ShapeDtypeStruct((global_batch, m, 4), jnp.float32),
    'classes': jax.ShapeDtypeStruct((global_batch, m), jnp.int32),
  }


def plan(
  config: Any,
  mesh: tuple[int, int],
  per_device_batch: int,
  devices: list,
  backend: str,
) -> dict[str, Any]:
  """Compiles the step for `devices` and returns the memory analysis.

  The step is traced with the 'xla' backend (`effdet_jax.ops`), the plain
  forms a TPU runs, whatever `backend` compiles it.
  """
  import jax  # noqa: PLC0415

  from effdet_jax import ops  # noqa: PLC0415
  from effdet_jax.train.trainer import Trainer  # noqa: PLC0415

  data, spatial = mesh
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.mesh.data, config.mesh.spatial = data, spatial
    config.train.batch_size = per_device_batch * data
  with ops.use_backend('xla'):
    with tempfile.TemporaryDirectory() as workdir:
      trainer = Trainer(config, workdir, devices=devices)
    batch = abstract_batch(config, config.train.batch_size)
    shardings = trainer.batch_sharding(batch)
    batch = {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
      for k, v in batch.items()
    }
    start = time.time()
    lowered = trainer.loop_step_fn(batch).lower(
      trainer.loop_abstract_with_shardings(), batch
    )
    compiled = lowered.compile()
  compile_s = time.time() - start
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  # XLA's cost analysis of the partitioned program: one device's share.
  flops = float((cost or {}).get('flops', 0.0))
  args = int(mem.argument_size_in_bytes)
  outs = int(mem.output_size_in_bytes)
  alias = int(mem.alias_size_in_bytes)
  temps = int(mem.temp_size_in_bytes)
  # What the device must hold at once: live arguments, outputs not aliased
  # to (donated) arguments, and the temporary buffer XLA assigns.
  total = args + outs - alias + temps
  result = {
    'config': config.model.name,
    'backend': backend,
    'device_kind': devices[0].device_kind,
    'mesh': {'data': data, 'spatial': spatial},
    'per_device_batch': per_device_batch,
    'global_batch': config.train.batch_size,
    'image_size': list(config.model.image_size),
    'dtype': config.model.dtype,
    'remat': bool(config.train.remat),
    'argument_bytes': args,
    'output_bytes': outs,
    'alias_bytes': alias,
    'temp_bytes': temps,
    'xla_peak_bytes': int(getattr(mem, 'peak_memory_in_bytes', 0) or 0),
    'per_device_bytes': total,
    'flops_per_device': flops,
    'compile_s': round(compile_s, 1),
  }
  return result


def implied_speed(result: dict[str, Any], gen: str) -> dict[str, float]:
  """Step time and images/s per device if the step ran at
  IMPLIED_UTILISATION of a `gen` device's peak: a planning figure from
  XLA's FLOP count, not a measurement."""
  flops = result['flops_per_device']
  rate = IMPLIED_UTILISATION * PEAK_TFLOPS[gen] * 1e12
  step_s = flops / rate if flops else float('nan')
  images = result['global_batch'] / (
    result['mesh']['data'] * result['mesh']['spatial']
  )
  return {
    'tpu': gen,
    'utilisation': IMPLIED_UTILISATION,
    'step_ms': round(1e3 * step_s, 2),
    'images_per_s_per_device': round(images / step_s, 2) if flops else 0.0,
  }


def verdicts(per_device_bytes: int, headroom: float) -> dict[str, dict]:
  """Fits / does not fit on each TPU generation's per-device memory."""
  out = {}
  for gen, gib in DEVICE_MEMORY_GIB.items():
    capacity = gib * 2**30
    out[gen] = {
      'device_gib': gib,
      'fits': per_device_bytes <= headroom * capacity,
    }
  return out


def _gib(n: int) -> str:
  return f'{n / 2**30:8.2f} GiB'


def format_text(r: dict[str, Any]) -> str:
  lines = [
    f'{r["config"]} {r["image_size"][0]}x{r["image_size"][1]} '
    f'dtype={r["dtype"]} remat={r["remat"]}',
    f'mesh data={r["mesh"]["data"]} x spatial={r["mesh"]["spatial"]}, '
    f'per-device batch {r["per_device_batch"]} (global {r["global_batch"]})',
    f'compiled for: {r["backend"]} ({r["device_kind"]}) in '
    f'{r["compile_s"]:.1f} s'
    + (
      ''
      if r['backend'] == 'tpu'
      else ' [CPU approximation of TPU memory, see README]'
    ),
    'per-device memory:',
    f'  arguments   {_gib(r["argument_bytes"])}',
    f'  outputs     {_gib(r["output_bytes"])} '
    f'(aliased to donated arguments: {_gib(r["alias_bytes"]).strip()})',
    f'  temporaries {_gib(r["temp_bytes"])}',
    f'  total       {_gib(r["per_device_bytes"])}  <- verdict',
  ]
  for gen, v in r['verdict'].items():
    word = 'fits' if v['fits'] else 'does NOT fit'
    lines.append(f'  TPU {gen:4s} {v["device_gib"]:3d} GiB/device: {word}')
  if 'implied' in r:
    i = r['implied']
    lines.append(
      f'compute: {r["flops_per_device"] / 1e12:.3f} TFLOP per step per '
      f"device; at {i['utilisation']:.0%} of a TPU {i['tpu']} device's "
      f'bf16 peak: {i["step_ms"]:.1f} ms per step, '
      f'{i["images_per_s_per_device"]:.1f} images/s per device'
    )
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.target == 'cpu':
    # The program is compiled, never run: skip LLVM's optimisation passes.
    # Memory comes from XLA's buffer assignment (HLO level), which they do
    # not change (D0 512 b8: identical bytes, compile 35 s -> 30 s).
    os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '')
      + ' --xla_backend_optimization_level=0'
      + ' --xla_llvm_disable_expensive_passes=true'
    )
  import jax  # noqa: PLC0415

  # Never touch an accelerator this process may find: the TPU target is a
  # compile-only topology, the CPU target fake CPU devices.
  try:
    jax.config.update('jax_platforms', 'cpu')
  except RuntimeError:  # backend already running (a notebook)
    pass
  config = f.config
  if f.remat is not None:
    with config.unlocked():
      config.train.remat = f.remat
  mesh = parse_mesh(f.mesh)
  n = mesh[0] * mesh[1]
  devices, backend = None, 'cpu'
  if f.target in ('auto', 'tpu'):
    try:
      devices, backend = tpu_devices(f.tpu, n), 'tpu'
    except Exception as e:  # noqa: BLE001 - any failure: fall back to CPU
      if f.target == 'tpu':
        raise
      logging.warning('TPU topology unavailable (%s); compiling for CPU', e)
  result = None
  if devices is not None:
    try:
      result = plan(config, mesh, f.per_device_batch, devices, backend)
    except Exception as e:  # noqa: BLE001
      if f.target == 'tpu':
        raise
      logging.warning('TPU compile failed (%s); compiling for CPU', e)
  if result is None:
    result = plan(config, mesh, f.per_device_batch, cpu_devices(n), 'cpu')
  result['verdict'] = verdicts(result['per_device_bytes'], f.headroom)
  result['implied'] = implied_speed(result, f.tpu)
  if f.format == 'json':
    print(json.dumps(result, sort_keys=True))
  else:
    print(format_text(result))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
