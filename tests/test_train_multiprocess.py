"""Two processes on localhost = one process with two devices (3 steps)."""

import os
import socket
import subprocess
import sys

import numpy as np
from conftest import REPO


def _env(devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
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
