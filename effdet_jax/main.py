"""`python -m effdet_jax.main --config=configs/d0.py --workdir=DIR [--mode=...]`

Thin entry point: flags, multi-process initialisation, the backend choice,
hide accelerators from TensorFlow (tf.data only), log the process and its
devices, then `train_and_evaluate(config, workdir)`.

Flags (besides the config's own overrides, `--config.train.batch_size=8`):

  --workdir   checkpoints, metrics.jsonl, TensorBoard events, eval json;
              a local folder or a URL (gs://bucket/run). It is probed
              first: one that cannot be written (a gs:// bucket without
              credentials) stops the run at once, before any compile.
  --mode      train_and_eval (default) | train | eval (the latest
              checkpoint of the workdir).
  --backend   auto | xla | cpu (default: $EFFDET_JAX_BACKEND, else auto):
              the forms `effdet_jax.ops` runs; 'cpu' = the XLA:CPU kernels
              (`effdet_jax/cpu`), 'xla' = the plain Flax/lax code TPUs and
              GPUs run, 'auto' = 'cpu' when JAX computes on the CPU.
  --verbose   other libraries' INFO logs too (see Console).
  --distributed, or --coordinator_address, --num_processes, --process_id:
              several processes (a TPU pod slice: --distributed).

Console: a few start lines (process and devices, backend, data), one line
per log step (`step N/TOTAL  loss X (cls Y, box Z)  lr L  R img/s  ETA
hh:mm:ss`), the COCO table of each evaluation, and the final metrics.
INFO logs of other libraries (orbax's checkpoint chatter, JAX, absl, clu,
TensorFlow's C++ INFO lines) are off; `--verbose` (or absl's `-v 1`, which
also shows DEBUG) brings them back, and `TF_CPP_MIN_LOG_LEVEL=0` TF's C++
INFO. (TensorFlow 2.21 prints its oneDNN notice at import whatever the
settings.) Warnings and errors always show. metrics.jsonl and TensorBoard
hold every metric either way.

Failures: SIGTERM and Ctrl-C save the current step and exit 0 (a second
Ctrl-C stops at once). An error ends with one message (its first lines) and
exit status 1; the full traceback is appended to `WORKDIR/error.log`
(`--verbose` prints it too).

On a CPU host the program re-executes itself once with glibc malloc
tunables (`effdet_jax/cpu/malloc_tuning.py`; `EFFDET_TUNE_MALLOC=0` opts
out); never on a TPU/GPU host or with `--backend=xla`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback

from effdet_jax.cpu import malloc_tuning

if __name__ == '__main__':
  # Re-executed here, before the imports below (JAX, Flax, and TensorFlow
  # through the config file), which the tuned process would pay again.
  # `_main` repeats the call for what argv alone cannot tell (a flagfile).
  malloc_tuning.reexec_if_untuned(
    backend=malloc_tuning.backend_from_argv(sys.argv)
  )

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from effdet_jax import compilation_cache, files, ops  # noqa: E402

# Loggers that use Python logging by name (orbax, clu and the absl-based
# libraries log through the 'absl' logger: `_OnlyOurInfo` filters those).
_QUIET_LOGGERS = ('jax', 'orbax', 'clu', 'tensorflow', 'etils', 'absl.flags')


def _define_flags() -> None:
  """The program's flags; defined only when it runs as a program (absl
  flags are process-global: importing two tools into one process must not
  define --config twice)."""
  config_flags.DEFINE_config_file(
    'config', None, 'Run config file (configs/*.py).', lock_config=True
  )
  flags.DEFINE_string('workdir', None, 'Checkpoints, logs, metrics.')
  flags.DEFINE_enum(
    'mode',
    'train_and_eval',
    ['train', 'eval', 'train_and_eval'],
    'What to run.',
  )
  flags.DEFINE_enum(
    'backend',
    None,
    list(ops.BACKENDS),
    f'effdet_jax.ops backend (default: ${ops.ENV_VAR}, else auto).',
  )
  flags.DEFINE_bool(
    'verbose', False, "Also other libraries' INFO logs (orbax, JAX, ...)."
  )
  flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 (multi-process runs).'
  )
  flags.DEFINE_integer('num_processes', None, 'Processes.')
  flags.DEFINE_integer('process_id', None, 'This process.')
  flags.DEFINE_bool(
    'distributed',
    False,
    'jax.distributed.initialize() with the cluster auto-detected (every '
    'worker of a TPU pod slice; launch/run.sh passes it).',
  )
  flags.mark_flags_as_required(['config', 'workdir'])


class _OnlyOurInfo(logging.Filter):
  """Passes warnings and errors, and INFO (or lower) of effdet_jax only."""

  _root = os.path.dirname(os.path.abspath(__file__)) + os.sep
  # Warnings that say nothing wrong: orbax warns that a reader
  # (`runtime/checkpoint.py: read_only_manager`) is read-only.
  _notices = ('Given directory is read only',)

  def filter(self, record: logging.LogRecord) -> bool:
    if os.path.abspath(record.pathname).startswith(self._root):
      return True
    if record.levelno >= logging.WARNING:
      return not str(record.msg).startswith(self._notices)
    return False


def _configure_console(verbose: bool) -> None:
  """Other libraries' INFO logs off unless `verbose` (module docstring)."""
  if verbose:
    return
  for name in _QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  absl_logging.get_absl_handler().addFilter(_OnlyOurInfo())


def _initialize_distributed(f: flags.FlagValues) -> None:
  """`jax.distributed.initialize()` when this is one of several processes."""
  if f.num_processes and f.num_processes > 1:
    jax.distributed.initialize(
      coordinator_address=f.coordinator_address,
      num_processes=f.num_processes,
      process_id=f.process_id,
    )
  elif (
    f.distributed
    or len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1
  ):
    jax.distributed.initialize()  # TPU pod slice: auto-detected


ERROR_LOG = 'error.log'
_MAX_MESSAGE_LINES = 20


def _fail(err: BaseException, workdir: str | None, verbose: bool) -> None:
  """Ends the program on an error: the full traceback goes to
  `WORKDIR/error.log` (appended), the console gets the error's message
  (its first lines) and where the detail is; exit status 1."""
  detail = ''.join(traceback.format_exception(err))
  where = 'not written (no workdir)'
  if workdir:
    path = files.join(workdir, ERROR_LOG)
    try:
      files.makedirs(workdir)
      stamp = time.strftime('%Y-%m-%d %H:%M:%S')
      files.append_text(path, f'--- {stamp} pid {os.getpid()}\n{detail}\n')
      where = path
    except Exception as write_err:  # noqa: BLE001 - e.g. a full disk
      where = f'not written ({type(write_err).__name__}: {write_err})'
  lines = (str(err).strip() or type(err).__name__).splitlines()
  if len(lines) > _MAX_MESSAGE_LINES:
    lines = lines[:_MAX_MESSAGE_LINES] + ['...']
  if verbose:
    sys.stderr.write(detail)
  sys.stderr.write(
    f'error ({type(err).__name__}): ' + '\n'.join(lines) + '\n'
    f'full traceback: {where}\n'
  )
  sys.stderr.flush()
  # os._exit: orbax/tensorstore threads would otherwise print pages of
  # shutdown noise after the message, or keep the process alive.
  logging.shutdown()
  os._exit(1)


def main(argv):
  f = flags.FLAGS
  try:
    _main(argv)
  except (SystemExit, app.UsageError):
    raise
  except KeyboardInterrupt:
    sys.stderr.write('interrupted (no checkpoint saved)\n')
    sys.stderr.flush()
    os._exit(130)
  except Exception as err:  # noqa: BLE001 - one message, detail in the log
    _fail(err, f.workdir, f.verbose)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  _configure_console(f.verbose or f.verbosity >= 1)
  # Both before any JAX backend starts, and only where the 'cpu' backend
  # will compute (decided without starting one).
  malloc_tuning.reexec_if_untuned(backend=f.backend)
  malloc_tuning.dispatch_inline(backend=f.backend)
  _initialize_distributed(f)
  # Before anything traces the model; logs the choice.
  ops.set_backend(f.backend)
  compilation_cache.enable(f.config)
  if f.mode in ('train', 'train_and_eval'):
    from effdet_jax.train import step_compile  # noqa: PLC0415

    # The first step's memory, faulted in beside the imports and the
    # restore (one CPU device with the malloc tunables only).
    step_compile.reserve_heap(f.config)
  import tensorflow as tf  # noqa: PLC0415 - tf.data only, no accelerators

  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
  logging.info(
    'process %d/%d, local devices: %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  from effdet_jax.train import trainer  # noqa: PLC0415

  config, workdir = f.config, f.workdir
  _check_workdir(workdir)
  if f.mode == 'eval':
    from effdet_jax.evaluation import runner  # noqa: PLC0415

    runner.evaluate_checkpoint(config, workdir)
    return
  evaluate_fn = None
  if f.mode == 'train_and_eval':
    from effdet_jax.evaluation import runner  # noqa: PLC0415

    evaluate_fn = runner.make_evaluate_fn(config, workdir)
  trainer.train_and_evaluate(config, workdir, evaluate_fn)
  if jax.process_index() == 0:
    _report(config, workdir)


def _check_workdir(workdir: str) -> None:
  """Stops the program with one message when the workdir cannot be
  written (a gs:// bucket without credentials), before anything compiles
  or the data is read: otherwise the first write, minutes later, fails."""
  try:
    files.check_writable(workdir)
  except OSError as err:
    raise SystemExit(f'error: --workdir={workdir}: {err}') from None


def _report(config, workdir: str) -> None:
  """Final COCO metrics and, when configured, drawn predictions."""
  evals = files.glob(files.join(workdir, 'eval', 'step_*.json'))
  if evals:
    last = max(evals, key=lambda p: int(p.rsplit('_', 1)[1].split('.')[0]))
    m = files.read_json(last)
    keys = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'ARmax100')
    print(f'COCO metrics ({last}):')
    print('  ' + '  '.join(f'{k} {m[k]:.3f}' for k in keys if k in m))
  # Drawing opens the checkpoint through orbax, which synchronises all
  # processes: only a single-process run can do it from process 0 alone.
  if config.eval.draw_predictions > 0 and jax.process_count() == 1:
    from effdet_jax.tools import draw_predictions  # noqa: PLC0415

    out = draw_predictions.draw_eval_predictions(
      config, workdir, config.eval.draw_predictions, config.eval.draw_min_score
    )
    print(f'drawn predictions: {out}')


if __name__ == '__main__':
  # TensorFlow's C++ INFO lines (oneDNN notices): the config file's imports
  # load TF while the flags are parsed, before `main` could decide.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  _define_flags()
  app.run(main)
