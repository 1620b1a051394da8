"""`train_and_evaluate(config, workdir)`: the training loop.

Resume order: the workdir's own checkpoint -> `init_from` (pretrained
weights, train/init_from.py) -> scratch. Each checkpoint keeps every host's
input position (data/position.py), from which the input restarts without
reading what came before, and per-step randomness comes from (seed, step),
so a resumed run is bitwise equal to an uninterrupted one on CPU.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from effdet_jax import api, files, initialization
from effdet_jax.cpu import heap_reserve
from effdet_jax.detection import anchors as anchors_lib
from effdet_jax.runtime import (
  checkpoint,
  partitioning,
  startup,
  workdir_lock,
)
from effdet_jax.train import (
  divergence,
  freeze,
  init_from,
  input_feed,
  optimizer,
  packed,
  schedule,
  step_compile,
)
from effdet_jax.train.state import TrainState
from effdet_jax.train.train_step import make_train_step

EvaluateFn = Callable[[TrainState, int], dict[str, float]]


class _Preemption:
  """Sets a flag on SIGTERM or Ctrl-C (SIGINT) so the loop can finish the
  step, save and exit 0; a second Ctrl-C stops at once."""

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._previous: dict = {}

  def __enter__(self):
    def handler(signum, frame):
      del frame
      if signum == signal.SIGINT and self.requested:
        raise KeyboardInterrupt  # the second Ctrl-C: no save
      logging.warning(
        '%s: saving a checkpoint after this step (Ctrl-C again to stop at '
        'once)',
        signal.Signals(signum).name,
      )
      self.requested = True

    for sig in self._SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, handler)
      except ValueError:  # not the main thread (e.g. a notebook worker)
        pass
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)

  def synced(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.array(self.requested))
    return bool(np.any(flags))


def _assemble(variables: dict, opt_state: Any, rng: Any) -> TrainState:
  """A fresh TrainState of these variables, optimizer state and rng."""
  params, batch_stats = variables['params'], variables['batch_stats']
  # The EMA gets its own arrays: `to_device` may hand an aligned NumPy
  # buffer to the CPU device without a copy, and params and EMA sharing
  # one buffer would break the step's donation of both.
  own = lambda tree: jax.tree.map(  # noqa: E731
    lambda x: np.array(x) if isinstance(x, np.ndarray) else x, tree
  )
  return TrainState(
    step=np.int32(0),
    params=params,
    batch_stats=batch_stats,
    opt_state=opt_state,
    ema_params=own(params),
    ema_batch_stats=own(batch_stats),
    rng=rng,
    num_skipped=np.int32(0),
    last_skipped_step=np.int32(-1),
  )


def _with_values(variables: dict, values: dict) -> dict:
  """`variables` with the leaves named in `values` ('params/...',
  'batch_stats/...') replaced, cast to the variable's dtype."""
  flat = traverse_util.flatten_dict(variables, sep='/')
  for name, value in values.items():
    if name in flat:
      flat[name] = np.asarray(value).astype(flat[name].dtype)
  return traverse_util.unflatten_dict(flat, sep='/')


def write_config(config: Any, workdir: str) -> None:
  """The resolved run config (+ the model section `effdet_jax.load` reads)."""
  if jax.process_index() != 0:
    return
  # A local path or gs://; `effdet_jax.load` may be reading it meanwhile.
  files.write_text(
    files.join(workdir, 'config.json'),
    config.to_json_best_effort(indent=2, sort_keys=True),
  )
  files.write_text(
    files.join(workdir, api.MODEL_CONFIG_FILE),
    json.dumps(config.model.to_dict(), indent=2, sort_keys=True),
  )


class Trainer:
  """Builds the model, mesh, state and jitted step for a config."""

  def __init__(
    self,
    config: Any,
    workdir: str,
    devices: list | None = None,
    *,
    cache_trace: bool = False,
  ):
    """`cache_trace`: take the model's abstract init trace from the
    executable cache when it holds it for this model config and these
    sources, and store it there otherwise (`_trace`)."""
    self.config = config
    self.workdir = workdir
    t = config.train
    self.model = api.build_model(
      config.model,
      remat=bool(t.remat),
      remat_policy=t.get('remat_policy', 'nothing_saveable'),
    )
    self.anchors = anchors_lib.anchors_from_config(config.model)
    self.mesh = partitioning.make_mesh(config.mesh, devices)
    self.steps = schedule.steps_from_config(t)
    self.lr_fn = schedule.learning_rate_fn(t, self.steps)
    self._host_lr_fn = schedule.learning_rate_fn(t, self.steps, xp=np)
    # One abstract trace of model.init: the state's structure and which
    # initialiser draws each variable (host_state).
    self._traced = self._trace(cache_trace)
    abstract_vars = self._traced[0]
    # Official var_freeze_expr over official names (train/freeze.py).
    frozen, frozen_stats = freeze.masks(
      abstract_vars, t.freeze, config.model.backbone_name
    )
    freeze_stats = bool(t.get('freeze_bn_stats', False))
    if t.freeze:
      freeze.log_counts(abstract_vars['params'], frozen, t.freeze, freeze_stats)
    wd_mask = jax.tree.map(
      lambda k, f: k and not f,
      optimizer.decay_mask(abstract_vars['params']),
      frozen,
    )
    self.tx = optimizer.make_optimizer(
      t.momentum, t.clip_gradients_norm, frozen if t.freeze else None
    )
    rng = jax.random.PRNGKey(t.seed)
    self._abstract_opt_state = jax.eval_shape(
      self.tx.init, abstract_vars['params']
    )
    self.abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
      _assemble(abstract_vars, self._abstract_opt_state, rng),
    )
    self.state_shardings = partitioning.state_shardings(
      self.mesh, self.abstract_state
    )
    self._rng = rng
    step_kw = dict(
      frozen=frozen if t.freeze else None,
      frozen_stats=frozen_stats if t.freeze and freeze_stats else None,
    )
    self._step = make_train_step(
      self.model, config, self.anchors, self.lr_fn, wd_mask, **step_kw
    )
    # The loop's form of the state: parameters, momentum and both EMAs in
    # flat vectors (train/packed.py), for a step that compiles in a fraction
    # of the time. None where the state cannot be packed (a leaf that is
    # not float32 or not replicated): the loop then runs the TrainState step.
    try:
      if not all(
        s.is_fully_replicated for s in jax.tree.leaves(self.state_shardings)
      ):
        raise ValueError('a state leaf is not replicated')
      self.layout = packed.Layout(self.abstract_state)
    except ValueError as err:
      logging.info('training state not packed: %s', err)
      self.layout = None
    if self.layout is not None:
      self._loop_step = make_train_step(
        self.model,
        config,
        self.anchors,
        self.lr_fn,
        wd_mask,
        layout=self.layout,
        **step_kw,
      )
      self._loop_shardings = self.layout.shardings(self.state_shardings)
    self._jitted = {}

  def _trace(self, cached: bool) -> tuple[dict, dict]:
    """`initialization.trace(self.model)`; with `cached`, from the
    executable cache (about 1 s of Python tracing for D0 saved at each
    warm start; keyed by the model config, the package's sources and the
    JAX version, like the stored step)."""
    if not cached:
      return initialization.trace(self.model)
    from effdet_jax.runtime import executable_cache  # noqa: PLC0415

    key = self.config.model.to_json_best_effort(sort_keys=True)
    traced = executable_cache.load_object('init_trace', key)
    if traced is None:
      traced = initialization.trace(self.model)
      executable_cache.store_object('init_trace', key, traced)
    return traced

  def host_state(self, variables: dict | None = None) -> TrainState:
    """The fresh state as host (NumPy) arrays, no compiled program.

    `variables`: {'params'/'batch_stats' flat '/'-joined name: array}
    replacing those leaves (and their EMA copies) before the optimizer
    state is made from the params.
    """
    init_rng, state_rng = jax.random.split(self._rng)
    host = initialization.host_variables(self.model, init_rng, self._traced)
    if variables:
      host = _with_values(host, variables)
    # Zeros on the host: a compiled tx.init cost 0.7 s at every start.
    opt_state = optimizer.host_initial_state(self._abstract_opt_state)
    return _assemble(host, opt_state, np.asarray(state_rng))

  def fresh_state(self) -> TrainState:
    """The fresh state, each leaf created in its sharding on the mesh."""
    return initialization.to_device(self.host_state(), self.state_shardings)

  def abstract_with_shardings(self) -> Any:
    return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      self.abstract_state,
      self.state_shardings,
    )

  def step_fn(self, batch: dict) -> Callable:
    """The jitted `TrainState` step for this batch structure (explicit
    shardings); the same numbers as `loop_step_fn`'s."""
    return self._jit(self._step, self.state_shardings, batch)

  def loop_step_fn(self, batch: dict) -> Callable:
    """The jitted step the training loop runs, on `to_loop`'s state."""
    if self.layout is None:
      return self.step_fn(batch)
    return self._jit(self._loop_step, self._loop_shardings, batch)

  def _jit(self, step: Callable, state_shardings: Any, batch: dict):
    key = (id(step), *sorted((k, np.shape(v)) for k, v in batch.items()))
    if key not in self._jitted:
      shardings = partitioning.batch_shardings(self.mesh, batch)
      self._jitted[key] = jax.jit(
        step,
        in_shardings=(state_shardings, shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
      )
    return self._jitted[key]

  def loop_abstract_with_shardings(self) -> Any:
    """`abstract_with_shardings` in the loop's form."""
    if self.layout is None:
      return self.abstract_with_shardings()
    return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      self.layout.abstract(self.abstract_state),
      self._loop_shardings,
    )

  def to_loop(self, state: TrainState) -> Any:
    """`state` in the loop's form (host work, no compiled program)."""
    if self.layout is None:
      return state
    return self.layout.pack(state, self._loop_shardings)

  def from_loop(self, state: Any) -> TrainState:
    """The `TrainState` of a loop state (host work, no compiled program)."""
    if self.layout is None:
      return state
    return self.layout.unpack(state, self.state_shardings)

  def learning_rate(self, step: int) -> jax.Array:
    """The learning rate of `step` (the step's input), replicated."""
    lr = np.asarray(self._host_lr_fn(step), np.float32)
    return jax.make_array_from_process_local_data(
      NamedSharding(self.mesh, PartitionSpec()), lr
    )

  def batch_sharding(self, batch: dict) -> dict:
    return partitioning.batch_shardings(self.mesh, batch)


def _train_batches(
  config: Any, trainer: Trainer, start_step: int, start: Any = None
):
  """(global batch, host input position after it) pairs from `start`.

  `start` None at a step > 0 (a checkpoint written without positions):
  the stream is read from its beginning and `start_step` batches dropped,
  which decodes them all.
  """
  from effdet_jax.data import checks, pipeline, position  # noqa: PLC0415

  data = config.data
  stats = checks.DataStats(
    strict=data.strict,
    max_consecutive_skips=int(data.get('max_consecutive_skips', 0)),
  )
  if start is None and start_step > 0:
    logging.warning(
      'the checkpoint holds no input position: re-reading %d batches to '
      'reach it',
      start_step,
    )
    ds = pipeline.train_dataset(config, stats=stats).skip(start_step)
  else:
    ds = pipeline.train_dataset(
      config, stats=stats, start=start or position.START
    )
  shardings = None
  try:
    for batch in ds.as_numpy_iterator():
      after = position.Position.after(batch['position'])
      batch = {k: batch[k] for k in ('image', 'boxes', 'classes')}
      if shardings is None:
        shardings = trainer.batch_sharding(batch)
      yield (
        {
          k: jax.make_array_from_process_local_data(shardings[k], v)
          for k, v in batch.items()
        },
        after,
      )
  except Exception:
    if stats.fatal:  # raised inside tf.data: the clean message, no trace
      raise checks.NoUsableExamplesError(stats.fatal) from None
    raise
  raise ValueError(
    f'the training input ended without a batch (skips: {stats.summary()})'
  )


def _input_feed(
  config: Any, trainer: Trainer, ckpt: Any, step: int
) -> input_feed.InputFeed:
  """The configured input from `step`'s saved position, pulled by a
  thread that starts now (`train/input_feed.py`)."""
  return input_feed.InputFeed(
    _train_batches(config, trainer, step, _input_start(config, ckpt, step))
  )


def _input_start(config: Any, ckpt: Any, step: int) -> Any:
  """This host's saved input position at `step` (None: not saved)."""
  from effdet_jax.data import position  # noqa: PLC0415 - imports tf

  if step == 0:
    return position.START
  payload = ckpt.restore_data(step)
  if payload is None:
    return None
  start, warning = position.from_payload(
    payload, jax.process_index(), jax.process_count()
  )
  if warning:
    logging.warning('%s', warning)
  return start


def _positions_payload(config: Any, where: Any) -> dict | None:
  """Every host's input position (a collective: all processes call it)."""
  from effdet_jax.data import pipeline, position  # noqa: PLC0415

  if where is None:
    return None
  mine = np.asarray(where.to_list(), np.int64)
  if jax.process_count() > 1:
    rows = multihost_utils.process_allgather(mine).reshape(-1, 2)
  else:
    rows = mine[None]
  host_batch = pipeline.host_batch_size(
    int(config.train.batch_size), jax.process_count()
  )
  return position.to_payload(
    [position.Position(int(e), int(o)) for e, o in rows], host_batch
  )


class _Run:
  """The bookkeeping of one training loop: step metrics not yet fetched,
  the rates for the ETA, the divergence guard."""

  def __init__(self, config: Any, start: int):
    t = config.train
    self.config = config
    self.pending: list[tuple[int, dict]] = []  # (step, device metrics)
    self.fetched: list[dict] = []  # host metrics since the last log line
    self.guard = divergence.DivergenceGuard(
      float(t.get('divergence_factor', 0.0)),
      int(t.get('divergence_window', 100)),
    )
    self.start = start
    self.last_time, self.last_step = time.time(), start
    # The ETA's rate leaves out the first log interval (it holds the
    # compile) and the evaluations (their time is not the steps').
    self.timed_steps, self.timed_s, self.tick = 0, 0.0, self.last_time

  def check(self, state: TrainState) -> None:
    """Fetches the pending step metrics; stops on a non-finite step
    (unless `train.skip_nonfinite`) or a diverging loss."""
    if not self.pending:
      return
    rows = jax.device_get([m for _, m in self.pending])
    steps = [s for s, _ in self.pending]
    self.pending = []
    for step, row in zip(steps, rows, strict=True):
      if int(row['nonfinite']) > 0 and not self.config.train.skip_nonfinite:
        raise FloatingPointError(
          f'non-finite loss, gradient or updated state at step {step}; the '
          'update was not applied and no checkpoint holds it (lower '
          'train.learning_rate, or set train.skip_nonfinite to skip such '
          'steps)'
        )
      self.guard.observe(step, float(row['loss']))
    self.fetched.extend(rows)

  def log(self, done: int, total: int, state: TrainState, writer) -> None:
    summary = _summarize(self.fetched)
    self.fetched = []
    now = time.time()
    rate = (done - self.last_step) / max(now - self.last_time, 1e-9)
    if self.last_step > self.start:
      self.timed_steps += done - self.last_step
      self.timed_s += now - self.tick
    self.last_time, self.last_step, self.tick = now, done, now
    summary.update(
      steps_per_sec=rate,
      images_per_sec=rate * self.config.train.batch_size,
      num_skipped=int(jax.device_get(state.num_skipped)),
    )
    writer.write_scalars(done, summary)
    if jax.process_index() == 0:
      steady = self.timed_steps / self.timed_s if self.timed_s > 0 else rate
      eta = (total - done) / max(steady, 1e-9)
      logging.info('%s', progress_line(done, total, summary, eta))


def train_and_evaluate(
  config: Any,
  workdir: str,
  evaluate_fn: EvaluateFn | None = None,
  batches: Any = None,
) -> TrainState:
  """Trains (resuming from the workdir) and evaluates periodically.

  Args:
    config: the full run config.
    workdir: checkpoints, metrics, the resolved config.
    evaluate_fn: `(state, step) -> metrics` (COCO evaluation; tests pass a
      fake one). Its metrics are logged and the best checkpoint kept by
      `checkpoint.best_metric`.
    batches: optional iterator of global batches to use instead of the
      configured input pipeline (given the start step).
  """
  timer = startup.StartupTimer()
  timer.mark('imports')
  from effdet_jax.data import dataset_checks  # noqa: PLC0415 - imports tf

  with workdir_lock.WorkdirLock(workdir) as lock:
    # Before any compile: data that cannot fit the config stops the run here.
    dataset_checks.prepare_training(config, workdir)
    trainer = Trainer(config, workdir, cache_trace=True)
    # Loads the step (and, with cores to spare, compiles it) while the
    # state is restored and the input starts (train/step_compile.py);
    # caller batches may differ from the config's: at the first batch.
    if batches is None:
      compiler = step_compile.StepCompiler.ahead(trainer, config)
    else:
      compiler = step_compile.StepCompiler(trainer, config, None)
    timer.mark('setup')
    ckpt = checkpoint.Checkpointer(
      workdir,
      config.checkpoint.every_steps,
      config.checkpoint.keep,
      config.checkpoint.best_metric,
      config.checkpoint.keep_best,
    )
    try:
      # A checkpoint of another config raises here, before config.json is
      # rewritten: the workdir stays as the run that wrote it left it.
      state = ckpt.restore(trainer.abstract_with_shardings())
      write_config(config, workdir)
      if state is None:  # no checkpoint of its own: init_from, else scratch
        state = init_from.initial_state(trainer, config, workdir)
      else:
        logging.info('resumed from step %d', int(state.step))
        if config.get('init_from') and config.init_from.path:
          logging.info('init_from ignored: the workdir has its own checkpoint')
      # The loop's form; the TrainState's own arrays are dropped here (its
      # BN statistics and counters are shared, and donated to the first
      # step), not held through the run.
      state = trainer.to_loop(state)
      timer.mark('init')
      return _loop(
        config,
        workdir,
        trainer,
        ckpt,
        state,
        evaluate_fn,
        batches,
        lock,
        timer,
        compiler,
      )
    finally:
      heap_reserve.release()  # a run that stopped before its first step
      ckpt.close()


def _loop(
  config,
  workdir,
  trainer,
  ckpt,
  state,
  evaluate_fn,
  batches,
  lock,
  timer,
  compiler,
):
  """The steps, evaluations and saves of `train_and_evaluate`; `state`
  in the loop's form (`Trainer.to_loop`)."""
  t = config.train
  start = int(state.step)
  total = trainer.steps.total
  # Here, not at the top: clu's writers import TensorFlow, and building the
  # step (Trainer, the benchmark's train mode) must not need it, e.g. on a
  # GPU/TPU machine that has JAX but no TensorFlow.
  from clu import periodic_actions  # noqa: PLC0415

  from effdet_jax.runtime import metrics  # noqa: PLC0415

  writer = metrics.create_writer(workdir)
  hooks = [
    periodic_actions.ReportProgress(num_train_steps=total, writer=writer)
  ]
  if t.profile_steps > 0 and jax.process_index() == 0:
    hooks.append(
      periodic_actions.Profile(
        num_profile_steps=t.profile_steps, logdir=workdir
      )
    )
  if batches is not None:  # the caller's batches: no input position
    feed = input_feed.InputFeed((b, None) for b in batches(start))
  else:
    feed = _input_feed(config, trainer, ckpt, start)
  where = None  # the input position after the last batch taken
  data = lambda: _positions_payload(config, where)  # noqa: E731
  eval_every = int(config.eval.every_steps)
  run = _Run(config, start)
  alone = jax.process_count() == 1
  step_exec = None
  if start >= total:
    heap_reserve.release()  # no step to use it
  logging.info('training steps %d..%d of %d', start + 1, total, total)
  # The loop carries the trainer's packed form (train/packed.py); saves,
  # evaluations and the caller get the TrainState, made when needed, once
  # per step, and dropped before the next step runs.
  unpacked = {}

  def tree() -> TrainState:
    if unpacked.get('of') is not state:
      unpacked.update(of=state, tree=trainer.from_loop(state))
    return unpacked['tree']

  def save_and_exit(done, eval_metrics=None):
    run.check(state)
    if ckpt.latest_step() != done:
      ckpt.save(done, tree, metrics=eval_metrics, force=True, data=data)
    logging.warning('preempted: saved step %d, exiting', done)
    raise SystemExit(0)

  # Pending async saves are finished (and their threads joined) on every
  # exit: normal end, preemption, a non-finite step or any error.
  try:
    with _Preemption() as preempt:
      for step in range(start, total):
        # A single process leaves at once on a signal that comes while it
        # waits for input; several agree at the next log step.
        try:
          batch, where = feed.next_batch(lambda: alone and preempt.requested)
        except input_feed.InputStopped:
          save_and_exit(step)
        batch = dict(batch, learning_rate=trainer.learning_rate(step))
        unpacked.clear()
        if step_exec is None:
          # Compiled explicitly, so the start-up line can tell the compile
          # from the data wait and the first step (shapes are static: one
          # program serves every batch). 'compile' is what is left of it
          # after the restore and the first batch.
          timer.mark('data')
          step_exec = compiler.get(batch)
          logging.info('training step: %s', compiler.how)
          partitioning.wait_for_all_processes('effdet_jax step compiled')
          timer.mark('compile')
        state, step_metrics = step_exec(state, batch)
        done = step + 1
        if step == start:
          jax.block_until_ready(step_metrics['loss'])
          timer.mark('first step')
          if jax.process_index() == 0:
            logging.info('%s', timer.line(done))
        run.pending.append((done, step_metrics))
        for h in hooks:
          h(done)
        log_now = done % t.log_every_steps == 0 or done == total
        if log_now or ckpt.manager.should_save(done):
          run.check(state)  # before any save: never checkpoint a bad step
        if log_now:
          run.log(done, total, state, writer)
          lock.refresh()
        eval_metrics = None
        if evaluate_fn and eval_every > 0 and done % eval_every == 0:
          eval_metrics = evaluate_fn(tree(), done)
          writer.write_scalars(
            done, {f'eval/{k}': v for k, v in eval_metrics.items()}
          )
          run.tick = time.time()  # the ETA's rate counts steps only
        ckpt.save(done, tree, metrics=eval_metrics, data=data)
        # Several processes agree on preemption at log steps only (it is a
        # collective); a single process checks after every step.
        if (alone or log_now) and preempt.synced():
          save_and_exit(done, eval_metrics)
    run.check(state)
    final_metrics = None
    if evaluate_fn and (eval_every <= 0 or total % eval_every != 0):
      final_metrics = evaluate_fn(tree(), total)
      writer.write_scalars(
        total, {f'eval/{k}': v for k, v in final_metrics.items()}
      )
    if ckpt.latest_step() != total:
      ckpt.save(total, tree, metrics=final_metrics, force=True, data=data)
  finally:
    feed.close()
    writer.flush()
  return tree()


def progress_line(
  step: int, total: int, summary: dict[str, float], eta_s: float
) -> str:
  """The console line of a log step: `step N/TOTAL  loss X (cls Y, box Z)
  lr L  R img/s  ETA hh:mm:ss`; `summary` has the step metrics' keys."""
  eta = int(round(eta_s))
  get = lambda key: summary.get(key, float('nan'))
  parts = [
    f'step {step}/{total}',
    f'loss {get("loss"):.4f} (cls {get("cls_loss"):.4f}, '
    f'box {get("box_loss"):.5f})',
    f'lr {get("learning_rate"):.4g}',
    f'{get("images_per_sec"):.1f} img/s',
    f'ETA {eta // 3600:02d}:{eta // 60 % 60:02d}:{eta % 60:02d}',
  ]
  if summary.get('num_skipped'):
    parts.append(f'skipped {int(summary["num_skipped"])}')
  return '  '.join(parts)


def _summarize(rows: list[dict]) -> dict[str, float]:
  """Means over the steps since the last log; `nonfinite` is a sum."""
  out = {}
  for key in rows[0]:
    values = np.asarray([np.asarray(r[key], np.float64) for r in rows])
    out[key] = float(values.sum() if key == 'nonfinite' else values.mean())
  return out
