"""Never lose a run: a changed config on resume, corrupt checkpoints, an
input that skips everything, signals while waiting for input, divergence,
two runs on one workdir, and the CLI's one-message failures."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from conftest import REPO, xla_flags
from train_utils import demo_cli, fixed_batch, tiny_config

import effdet_jax
from effdet_jax.data import checks
from effdet_jax.runtime import checkpoint, workdir_lock
from effdet_jax.train import divergence
from effdet_jax.train.trainer import train_and_evaluate


def _config(**train):
  # A constant schedule: the step program does not depend on num_steps, so
  # the runs below with other lengths share one compile.
  train.setdefault('lr_decay_method', 'constant')
  config = tiny_config(num_steps=6, **train)
  config.mesh.data = 1
  config.checkpoint.every_steps = 3
  return config


def _batches(config):
  good = fixed_batch(config)

  def batches(start):
    for _ in range(start, 10_000):
      yield good

  return batches


def _steps(workdir):
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))


def _snapshot(workdir):
  """{relative path: bytes} of every file under the workdir's checkpoints
  plus config.json."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, workdir)
      if rel.startswith('checkpoints') or rel == 'config.json':
        with open(path, 'rb') as f:
          out[rel] = f.read()
  return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A 6-step tiny run with checkpoints at steps 1, 3 and 6."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  config = _config()
  train_and_evaluate(config, workdir, batches=_batches(config))
  # (orbax also keeps the first step of a run.)
  assert _steps(workdir) == ['1', '3', '6']
  return workdir


def _copy(src, dst):
  import shutil

  shutil.copytree(src, dst)
  return str(dst)


@pytest.mark.slow
def test_changed_config_on_resume_stops_and_changes_nothing(trained, tmp_path):
  workdir = _copy(trained, tmp_path / 'w')
  before = _snapshot(workdir)
  config = _config(freeze='(efficientnet|fpn_cells|resample_p6)')
  config.train.num_steps = 12
  t0 = time.time()
  with pytest.raises(checkpoint.CheckpointMismatchError) as err:
    train_and_evaluate(config, workdir, batches=_batches(config))
  message = str(err.value)
  # Names the step, a few leaves, a count and both ways out, in few lines.
  assert 'checkpoint step 6' in message and 'more' in message
  assert 'opt_state/' in message
  assert 'config.json' in message and 'init_from' in message
  assert len(message.splitlines()) <= 12
  # No checkpoint moved, deleted or added; config.json not rewritten.
  assert _snapshot(workdir) == before
  assert time.time() - t0 < 120
  # Another model width: the shapes are named.
  config = _config()
  config.model.fpn_num_filters = 24
  with pytest.raises(
    checkpoint.CheckpointMismatchError, match=r'\(16,\) saved'
  ):
    train_and_evaluate(config, workdir, batches=_batches(config))
  assert _snapshot(workdir) == before


def _corrupt(workdir, step):
  """Truncates every file of a step (as a disk fault or a half-copied
  workdir would leave it)."""
  root = os.path.join(workdir, 'checkpoints', str(step))
  for sub, _, names in os.walk(root):
    for name in names:
      with open(os.path.join(sub, name), 'wb'):
        pass


@pytest.mark.slow
def test_corrupt_latest_checkpoint_is_set_aside_and_readers_fall_back(
  trained, tmp_path, caplog
):
  workdir = _copy(trained, tmp_path / 'w')
  _corrupt(workdir, 6)
  # Readers: the newest readable step, said in one line, nothing moved.
  model, variables = effdet_jax.load(workdir)
  assert _steps(workdir) == ['1', '3', '6']
  assert any('using step 3' in r.getMessage() for r in caplog.records)
  manager = checkpoint.read_only_manager(workdir)
  step, _ = checkpoint.restore_newest_readable(
    manager,
    lambda s: manager.restore(
      s,
      args=checkpoint.ocp.args.Composite(
        variables=checkpoint.ocp.args.StandardRestore()
      ),
    ),
  )
  manager.close()
  assert step == 3
  # Training: resumes from 3, the corrupt step moved aside (kept, never
  # counted by keep-last-K), then trains on to 9 with 3, 6, 9 kept.
  config = _config()
  config.train.num_steps = 9
  config.checkpoint.keep = 2
  state = train_and_evaluate(config, workdir, batches=_batches(config))
  assert int(state.step) == 9
  assert _steps(workdir) == ['6', '9', 'corrupt-6']
  assert os.listdir(os.path.join(workdir, 'checkpoints', 'corrupt-6'))
  moved = [
    r.getMessage() for r in caplog.records if 'corrupt-6' in r.getMessage()
  ]
  assert len(moved) == 1 and 'step 6 is unreadable' in moved[0]


def _bad_json(tmp_path, n=3):
  """A coco_json dataset whose every image has width and height swapped."""
  from PIL import Image

  images, annotations = [], []
  for i in range(n):
    name = f'{i}.png'
    Image.new('RGB', (40, 24), (i * 40, 90, 160)).save(tmp_path / name)
    images.append({'id': i + 1, 'file_name': name, 'width': 24, 'height': 40})
    annotations.append(
      {
        'id': i + 1,
        'image_id': i + 1,
        'category_id': 1,
        'bbox': [2, 2, 10, 10],
        'area': 100,
        'iscrowd': 0,
      }
    )
  path = tmp_path / 'train.json'
  path.write_text(
    json.dumps(
      {
        'images': images,
        'annotations': annotations,
        'categories': [{'id': 1, 'name': 'a'}],
      }
    )
  )
  return str(path)


def test_input_that_skips_every_image_stops_with_the_reasons(tmp_path):
  from effdet_jax.train import trainer as trainer_lib

  config = _config()
  config.model.num_classes = 1
  d = config.data
  d.source, d.label_map = 'coco_json', ''
  d.train_json, d.train_images = _bad_json(tmp_path), str(tmp_path)
  d.max_consecutive_skips = 20
  d.check_dataset = False
  config.train.batch_size = 2

  class FakeTrainer:
    def batch_sharding(self, batch):
      raise AssertionError('no batch can come out')

  t0 = time.time()
  with pytest.raises(checks.NoUsableExamplesError) as err:
    next(trainer_lib._train_batches(config, FakeTrainer(), 0))
  assert time.time() - t0 < 60
  # (Parallel map calls may add a few past the limit.)
  assert re.search(r'skipped (2\d) images in a row', str(err.value))
  assert 'image_size_mismatch=' in str(err.value)


def _stalling_batches(config, stall_from):
  good = fixed_batch(config)

  def batches(start):
    for step in range(start, 10_000):
      while step >= stall_from:
        time.sleep(0.05)  # a stalled file system
      yield good

  return batches


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_while_input_stalls_saves_and_exits_zero(tmp_path, sig):
  config = _config()
  config.train.num_steps = 1000
  config.checkpoint.every_steps = 1000
  workdir = str(tmp_path)
  batches = _stalling_batches(config, 2)

  # The signal comes once step 2 is logged: the loop then waits for step
  # 3's input, which has stalled (a signal that came before the wait would
  # be seen after step 2 all the same).
  def logged_steps():
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
      return []
    with open(path) as f:
      return [json.loads(x)['step'] for x in f if x.strip().endswith('}')]

  def watch():
    while 2 not in logged_steps():
      time.sleep(0.1)
    time.sleep(0.5)
    os.kill(os.getpid(), sig)

  threading.Thread(target=watch, daemon=True).start()
  t0 = time.time()
  with pytest.raises(SystemExit) as exit_info:
    train_and_evaluate(config, workdir, batches=batches)
  assert exit_info.value.code == 0
  assert time.time() - t0 < 300
  assert _steps(workdir) == ['1', '2']
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))


def test_second_ctrl_c_stops_at_once():
  from effdet_jax.train.trainer import _Preemption

  previous = signal.getsignal(signal.SIGINT)
  with _Preemption() as preempt:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    assert preempt.requested
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.5)
  # The previous handlers are back.
  assert signal.getsignal(signal.SIGINT) is previous


@pytest.mark.slow
def test_divergence_stops_before_saving_the_diverged_state(tmp_path):
  config = _config(learning_rate=1e6, lr_warmup_init=1e6)
  config.train.num_steps = 30
  config.checkpoint.every_steps = 1
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError) as err:
    train_and_evaluate(config, workdir, batches=_batches(config))
  message = str(err.value)
  bad = int(message.split('at step ')[1].split(':')[0].split(';')[0])
  assert 'learning_rate' in message
  saved = [int(s) for s in _steps(workdir)]
  # Every checkpoint is from before the first bad step, and is finite.
  assert saved and max(saved) < bad
  model, variables = effdet_jax.load(workdir)
  assert all(
    np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables)
  )


def test_divergence_guard_rule():
  guard = divergence.DivergenceGuard(factor=10, window=5)
  for step, loss in enumerate([3.0, 2.5, 2.8, 20.0, 2.0, 1.9], 1):
    guard.observe(step, loss)  # 20 < 10 x median: noisy, not diverged
  with pytest.raises(divergence.TrainingDivergedError, match='at step 7'):
    guard.observe(7, 1e4)
  off = divergence.DivergenceGuard(factor=0)
  for step, loss in enumerate([1.0, 1.0, 1.0, 1e9], 1):
    off.observe(step, loss)


def test_second_run_on_a_workdir_fails_naming_the_holder(tmp_path):
  workdir = str(tmp_path)
  with workdir_lock.WorkdirLock(workdir):
    config = _config()
    t0 = time.time()
    with pytest.raises(workdir_lock.WorkdirLockedError) as err:
      train_and_evaluate(config, workdir, batches=_batches(config))
    assert time.time() - t0 < 30
    assert f'pid {os.getpid()}' in str(err.value)
    assert socket.gethostname() in str(err.value)
  # Released on exit; a lock left by a dead process is taken over.
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': dead.pid}, f)
  with workdir_lock.WorkdirLock(workdir) as lock:
    holder = json.loads(open(lock.path).read())
    assert holder['pid'] == os.getpid()
  # Another host's lock is live until it goes unrefreshed too long.
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), 'w') as f:
    json.dump({'host': 'other', 'pid': 1, 'refreshed': time.time()}, f)
  with pytest.raises(workdir_lock.WorkdirLockedError, match='host other'):
    workdir_lock.WorkdirLock(workdir).acquire()
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), 'w') as f:
    json.dump({'host': 'other', 'pid': 1, 'refreshed': time.time() - 3600}, f)
  with workdir_lock.WorkdirLock(workdir, stale_after_s=900):
    pass


@pytest.mark.slow
def test_cli_error_is_one_short_message_with_the_detail_in_the_workdir(
  tmp_path,
):
  workdir = tmp_path / 'w'
  os.makedirs(workdir)
  with workdir_lock.WorkdirLock(str(workdir)):
    proc = subprocess.run(
      demo_cli(workdir),
      cwd=REPO,
      env=dict(os.environ, XLA_FLAGS=xla_flags(1)),
      capture_output=True,
      text=True,
      timeout=300,
    )
  assert proc.returncode == 1
  ours = [
    line
    for line in proc.stderr.splitlines()
    if not line.startswith(('I', 'W0000', 'WARNING: All log'))
  ]
  assert ours[0].startswith('error (WorkdirLockedError): workdir')
  assert len(ours) <= 4, proc.stderr
  log = (workdir / 'error.log').read_text()
  assert 'Traceback' in log and 'WorkdirLockedError' in log
