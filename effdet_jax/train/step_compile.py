"""The training step loaded or compiled ahead, while the run restores its
state and starts its input.

The step's program depends only on the abstract state and the batch's
shapes, dtypes and shardings, all known from the config before a checkpoint
is read or a record decoded. `StepCompiler` loads it from the executable
cache (`runtime/executable_cache.py`) in a background thread and, on a
machine with cores to spare (`compiles_ahead`), traces, lowers and compiles
it there on a miss; XLA releases the GIL while it compiles, so the
restore and the first batch proceed meanwhile. `get(batch)` hands the
executable over when the real batch matches what it was made for, and
otherwise compiles for the real batch (logged), so a config the prediction
misses costs time, never correctness.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import threading
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from effdet_jax.cpu import compile_options, heap_reserve
from effdet_jax.runtime import executable_cache

AHEAD_MIN_CORES = 4
_STEP_SECTIONS = ('model', 'train', 'mesh')
_SCHEDULE_FIELDS = (
  'learning_rate',
  'lr_decay_method',
  'lr_warmup_epoch',
  'lr_warmup_init',
  'lr_warmup_steps',
  'first_lr_drop_epoch',
  'second_lr_drop_epoch',
  'poly_lr_power',
  'num_epochs',
  'num_examples_per_epoch',
  'num_steps',
  'log_every_steps',
  'profile_steps',
  'divergence_factor',
  'divergence_window',
)


def step_config_json(config: Any) -> str:
  """The config sections the training step is built from, as the
  executable cache's key part (train/trainer.py: Trainer,
  train/train_step.py: make_train_step); data, eval and checkpointing
  reach the step only through the batch's shapes, which the cache keys
  separately. The schedule's fields are left out: the trainer passes the
  learning rate as an input (train/train_step.py), so a run that changes
  only its schedule reuses the program. The compile options
  (`step_compiler_options`) are part of it."""
  sections = {
    k: json.loads(config[k].to_json_best_effort()) for k in _STEP_SECTIONS
  }
  for name in _SCHEDULE_FIELDS:
    sections['train'].pop(name, None)
  sections['compiler_options'] = step_compiler_options()
  return json.dumps(sections, sort_keys=True)


def step_compiler_options() -> dict:
  """XLA compile options of the training step on this process's default
  backend (cpu/compile_options.py; {} on TPU and GPU)."""
  return compile_options.step_options(jax.default_backend())


def reserve_heap(config: Any) -> None:
  """Starts faulting in the memory the first training step of `config`
  will take, as the executable cache recorded it (cpu/heap_reserve.py):
  on one CPU device with the malloc tunables, else nothing. Call it on
  the main thread as early as the config is known; `StepCompiler.get`
  frees it for the first step."""
  if not _reserve_applies():
    return
  nbytes = executable_cache.heap_hint('train_step', step_config_json(config))
  if nbytes:
    # Room for the small buffers a step allocates beside its temporaries
    # (the batch, metrics, TF's): carved from the freed block before the
    # temporaries, they would otherwise push those onto fresh pages.
    heap_reserve.start(nbytes + nbytes // 16 + (64 << 20))


def _reserve_applies() -> bool:
  """One CPU device, and the heap a reserve can serve (heap_reserve.py)."""
  return (
    jax.device_count() == 1
    and jax.devices()[0].platform == 'cpu'
    and heap_reserve.applies()
  )


def batch_spec(config: Any, batch_shardings) -> dict[str, Any]:
  """The global training batch the input pipeline yields for `config`
  (`data/pipeline.py: train_dataset`, the keys the trainer keeps), as
  ShapeDtypeStructs with their shardings; `batch_shardings(batch)` gives
  the shardings (`Trainer.batch_sharding`)."""
  b = int(config.train.batch_size)
  h, w = (int(x) for x in config.model.image_size)
  m = int(config.data.max_instances_per_image)
  shapes = {
    'image': ((b, h, w, 3), np.float32),
    'boxes': ((b, m, 4), np.float32),
    'classes': ((b, m), np.int32),
  }
  spec = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
  shardings = batch_shardings(spec)
  spec = {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
    for k, v in spec.items()
  }
  return spec


def _avals(batch: dict) -> dict:
  return {
    k: (tuple(np.shape(v)), np.dtype(v.dtype), getattr(v, 'sharding', None))
    for k, v in batch.items()
  }


def compiles_ahead() -> bool:
  """Whether the step may compile beside the restore and the input.

  XLA:CPU's compile already keeps about 1.5 cores busy, so on fewer than
  `AHEAD_MIN_CORES` cores running it beside the input pipeline and the
  host-side init only slows each down (2-core CPU, D0: 4-7 s longer to
  the first step, cold); there the step compiles when the first batch is
  in, and only a load from the executable cache runs ahead.
  """
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 1
  return cores >= AHEAD_MIN_CORES


class StepCompiler:
  """The trainer's step for `predicted` (a batch spec, learning rate
  included), loaded or compiled in a background thread; with None, or
  for a batch that differs from it, compiled at `get`."""

  def __init__(
    self,
    trainer: Any,
    config: Any,
    predicted: dict | None,
    compile_ahead: bool | None = None,
  ):
    self._trainer = trainer
    self._config_json = step_config_json(config)
    self._predicted = predicted
    self._compile_ahead = (
      compiles_ahead() if compile_ahead is None else compile_ahead
    )
    self._future = None
    self.how = ''
    if predicted is not None:
      self._future = concurrent.futures.Future()
      # A daemon thread: a run that stops before its first step (a bad
      # checkpoint, a signal) exits without waiting for the compile.
      threading.Thread(
        target=self._run, name='effdet-step-compile', daemon=True
      ).start()

  def _run(self) -> None:
    try:
      self._future.set_result(self._ahead())
    except BaseException as err:  # noqa: BLE001 - re-raised by get()
      self._future.set_exception(err)

  @classmethod
  def ahead(cls, trainer: Any, config: Any, **kw: Any) -> StepCompiler:
    """Starts loading (or compiling) for the batch `config` implies."""
    spec = batch_spec(config, trainer.batch_sharding)
    lr = trainer.learning_rate(0)
    spec['learning_rate'] = jax.ShapeDtypeStruct(
      lr.shape, lr.dtype, sharding=NamedSharding(trainer.mesh, PartitionSpec())
    )
    return cls(trainer, config, spec, **kw)

  def _args(self, batch: dict) -> tuple:
    return (self._trainer.loop_abstract_with_shardings(), batch)

  def _ahead(self) -> Any | None:
    args = self._args(self._predicted)
    compiled = executable_cache.load('train_step', self._config_json, args)
    if compiled is not None:
      self.how = 'loaded'
      return compiled
    if not self._compile_ahead:
      return None  # get() compiles
    return self._compile(self._predicted)

  def _compile(self, batch: dict) -> Any:
    compiled, self.how = executable_cache.compile_and_store(
      self._trainer.loop_step_fn(batch),
      self._args(batch),
      name='train_step',
      config_json=self._config_json,
      compiler_options=step_compiler_options(),
    )
    return compiled

  def get(self, batch: dict) -> Any:
    """The compiled step for `batch` (waits for the background work);
    frees the heap reserve for the first step to use."""
    compiled = self._get(batch)
    if self.how in ('loaded', 'compiled') and _reserve_applies():
      executable_cache.store_heap_hint(
        'train_step', self._config_json, compiled
      )
    heap_reserve.release()  # the first step's memory, faulted in
    return compiled

  def _get(self, batch: dict) -> Any:
    if self._future is not None:
      compiled = self._future.result()
      if _avals(batch) == _avals(self._predicted):
        return compiled if compiled is not None else self._compile(batch)
      logging.warning(
        'the first batch differs from the one the step was compiled for '
        '(%s, expected %s): compiling again',
        json.dumps({k: str(v[:2]) for k, v in _avals(batch).items()}),
        json.dumps({k: str(v[:2]) for k, v in _avals(self._predicted).items()}),
      )
    compiled, self.how = executable_cache.load_or_compile(
      self._trainer.loop_step_fn(batch),
      self._args(batch),
      name='train_step',
      config_json=self._config_json,
      compiler_options=step_compiler_options(),
    )
    return compiled
