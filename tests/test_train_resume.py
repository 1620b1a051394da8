"""Preemption and resume through the real CLI (`python -m effdet_jax.main`)."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import REPO, xla_flags
from train_utils import demo_cli

from effdet_jax import config_files
from effdet_jax.runtime import checkpoint
from effdet_jax.train.trainer import Trainer

# CLI subprocess runs: real training processes (CI runs them).
pytestmark = pytest.mark.slow


def _env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_flags(1)
  return env


def _logged_step(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    rows = [json.loads(x) for x in f if x.strip()]
  return max([r['step'] for r in rows if 'loss' in r], default=0)


def _start_and_wait(workdir, step, *extra):
  proc = subprocess.Popen(
    demo_cli(workdir, *extra),
    cwd=REPO,
    env=_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 600
  while _logged_step(workdir) < step:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline, 'training did not reach the step'
    time.sleep(0.2)
  return proc


def _final_state(workdir):
  demo = config_files.load_module('demo')

  tr = Trainer(demo.get_config('test'), str(workdir), devices=jax.devices()[:1])
  ckpt = checkpoint.Checkpointer(str(workdir), 3, 3)
  state = ckpt.restore(tr.abstract_with_shardings())
  ckpt.close()
  return jax.device_get(state)


def test_sigkill_then_resume_is_bitwise_equal(tmp_path):
  a, b = tmp_path / 'a', tmp_path / 'b'
  subprocess.run(
    demo_cli(a),
    cwd=REPO,
    env=_env(),
    check=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  # Kill after step 4 (checkpoints every 3 steps), then resume to step 6.
  proc = _start_and_wait(b, 4)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _logged_step(b) < 6
  subprocess.run(
    demo_cli(b),
    cwd=REPO,
    env=_env(),
    check=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  sa, sb = _final_state(a), _final_state(b)
  assert int(sa.step) == int(sb.step) == 6
  # Each checkpoint keeps the input position after its last batch: 6 steps
  # of 4 images into the 64-image epoch 0 (the resumed run started at 12).
  ckpt = checkpoint.Checkpointer(str(b), 3, 3)
  assert ckpt.restore_data(6)['positions'] == [[0, 24]]
  ckpt.close()
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The workdir opens as a model (EMA variables of the latest step).
  import effdet_jax

  model, variables = effdet_jax.load(str(b))
  np.testing.assert_array_equal(
    variables['params']['class_net']['class-predict']['bias'],
    sb.ema_params['class_net']['class-predict']['bias'],
  )
  assert model.fpn_num_filters == 16


def test_sigterm_saves_current_step_and_exits_zero(tmp_path):
  proc = _start_and_wait(tmp_path, 2, '--config.train.num_steps=1000')
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  last = _logged_step(tmp_path)
  steps = sorted(
    int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()
  )
  assert steps[-1] == last and last % 3 != 0 or steps[-1] == last
  assert 'preempted' in err
