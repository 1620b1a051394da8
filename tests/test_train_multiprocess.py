"""Two processes on localhost: equal to one process with two devices (3
steps); the CLI (`python -m effdet_jax.main`) checkpoints on SIGTERM and
resumes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, xla_flags
from train_utils import demo_cli

from effdet_jax import config_files
from effdet_jax.runtime import checkpoint
from effdet_jax.train.trainer import Trainer

# CLI subprocess runs: real training processes (CI runs them).
pytestmark = pytest.mark.slow


def _env(devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_flags(devices)
  env['PYTHONPATH'] = str(REPO / 'tests')
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
  worker = str(REPO / 'tests' / 'multiprocess_worker.py')
  port = str(_free_port())
  procs = [
    subprocess.Popen(
      [sys.executable, worker, str(tmp_path / 'multi.npz'), str(i), '2', port],
      cwd=REPO,
      env=_env(1),
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
  subprocess.run(
    [sys.executable, worker, str(tmp_path / 'single.npz')],
    cwd=REPO,
    env=_env(2),
    check=True,
    capture_output=True,
  )
  multi, single = (
    np.load(tmp_path / 'multi.npz'),
    np.load(tmp_path / 'single.npz'),
  )
  assert sorted(multi.files) == sorted(single.files)

  def flat(npz, prefix):
    keys = sorted(k for k in npz.files if k.startswith(prefix))
    return np.concatenate([npz[k].ravel() for k in keys])

  # The updates (params after - before) and the BN statistics.
  for name, x, y in (
    (
      'update',
      flat(multi, 'params/') - flat(multi, 'init/'),
      flat(single, 'params/') - flat(single, 'init/'),
    ),
    ('batch_stats', flat(multi, 'batch_stats/'), flat(single, 'batch_stats/')),
  ):
    assert np.linalg.norm(x - y) / np.linalg.norm(y) <= 1e-4, name


def _main(workdir, port, pid, *extra):
  """`python -m effdet_jax.main` as process `pid` of 2 (1 CPU device each)."""
  return subprocess.Popen(
    demo_cli(
      workdir,
      '--config.eval.draw_predictions=0',
      f'--coordinator_address=localhost:{port}',
      '--num_processes=2',
      f'--process_id={pid}',
      *extra,
    ),
    cwd=REPO,
    env=_env(1),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


def _logged_steps(workdir):
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
  return [r['step'] for r in rows if 'loss' in r]


def _checkpoint_params(workdir, step):
  tr = Trainer(config_files.load('demo:test'), str(workdir), jax.devices()[:1])
  ckpt = checkpoint.Checkpointer(str(workdir), 3, 10)
  state = ckpt.manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(tr.abstract_with_shardings())
    ),
  ).state
  ckpt.close()
  return jax.device_get(state.params)


def test_two_process_cli_sigterm_and_resume(tmp_path):
  """SIGTERM to both processes of a CLI run -> both save the same step and
  exit 0; a restart resumes there with exactly the saved parameters."""
  port = _free_port()
  procs = [
    _main(tmp_path, port, i, '--config.train.num_steps=1000') for i in (0, 1)
  ]
  try:
    deadline = time.time() + 900
    while len(_logged_steps(tmp_path)) < 2:
      for p in procs:
        assert p.poll() is None, p.communicate()[1][-3000:]
      assert time.time() < deadline, 'the 2-process run did not train'
      time.sleep(0.2)
    for p in procs:
      p.send_signal(signal.SIGTERM)
    for p in procs:
      _, err = p.communicate(timeout=300)
      assert p.returncode == 0, err[-3000:]
      assert 'preempted: saved step' in err
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  saved = max(
    int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()
  )
  # The step being logged when the signal came may finish before the save.
  assert saved >= _logged_steps(tmp_path)[-1] >= 2
  # Restart with a learning rate of 0 for one more step: the parameters of
  # that step are the restored ones, bit for bit.
  port = _free_port()
  procs = [
    _main(
      tmp_path,
      port,
      i,
      f'--config.train.num_steps={saved + 1}',
      '--config.train.learning_rate=0',
      '--config.train.lr_warmup_init=0',
    )
    for i in (0, 1)
  ]
  # Both stderrs on failure: one process dying shows in the other only as a
  # collective timeout.
  errs = [p.communicate(timeout=600)[1] for p in procs]
  for i, (p, err) in enumerate(zip(procs, errs, strict=True)):
    assert p.returncode == 0, '\n'.join(
      f'[{j}] {e[-3000:]}' for j, e in enumerate(errs)
    )
    assert f'resumed from step {saved}' in err, i
  before = _checkpoint_params(tmp_path, saved)
  after = _checkpoint_params(tmp_path, saved + 1)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(x, y)
