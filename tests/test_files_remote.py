"""The file layer (effdet_jax/files.py) on a filesystem that is not local.

What is tested, exactly:
- every files.py function on a local tmp dir and on TensorFlow's in-memory
  filesystem `ram://`, which runs the URL code path, the one gs:// takes
  (tf.io.gfile); errors come out as FileNotFoundError on both;
- `check_writable`: a local folder, a ram:// folder (the probe object is
  removed again), a gs:// folder whose probe fails (the message names the
  folder and the credentials fix) and one whose probe never answers (the
  deadline);
- `python -m effdet_jax.main ... --workdir=gs://...` without credentials
  exits 1 with that message before anything compiles (no gs:// request
  succeeds here or in CI without credentials);
- orbax is handed an `epath.Path` whose str is the URL (`gs://bucket/run/
  checkpoints`, not `<cwd>/gs:/bucket/run/...`): `ocp.CheckpointManager`
  and `ocp.StandardCheckpointer` are replaced by recorders, no gs:// I/O;
- the whole cycle with the workdir on ram://, in process: train 3 steps
  (checkpoint) -> `--mode=eval` (`runner.evaluate_checkpoint`) -> resume to
  step 6 -> `effdet_jax.load(workdir)` -> `tools.infer.run` from and to
  ram:// -> main's final report (eval json glob + drawn predictions) ->
  `init_from` the ram:// workdir -> `effdet_jax.save`/`load` on ram://.
  Orbax (tensorstore) cannot open ram://, so the checkpoint folders alone
  (`checkpoint.checkpoint_dir`, `checkpoint.saved_variables_dir`) are
  redirected to a local tmp dir; config.json, model_config.json,
  label_map.json, run.lock, metrics.jsonl, the TensorBoard events, the eval
  json, drawn predictions, init_from_report.txt and the infer outputs are
  written to and read from ram://, and nothing else lands on local disk.
"""

import os
import subprocess
import sys
import threading
import uuid

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO
from etils import epath
from PIL import Image

import effdet_jax
from effdet_jax import api, config_files, files, inference
from effdet_jax.evaluation import runner
from effdet_jax.runtime import checkpoint, metrics
from effdet_jax.tools import infer


@pytest.fixture(params=['local', 'ram'])
def root(request, tmp_path):
  """An empty folder: a local tmp dir, or a fresh one on ram://."""
  if request.param == 'local':
    return str(tmp_path)
  return f'ram://{uuid.uuid4().hex}'


def test_is_remote_absolute_path_join():
  assert files.is_remote('gs://b/run') and files.is_remote('ram://x')
  assert not files.is_remote('run') and not files.is_remote('/tmp/run')
  assert files.absolute('gs://b/run') == 'gs://b/run'
  assert files.absolute('run') == os.path.join(os.getcwd(), 'run')
  assert files.join('gs://b/run', 'eval', 'a.json') == 'gs://b/run/eval/a.json'
  assert isinstance(files.path('gs://b/run'), epath.Path)
  assert (
    str(files.path('gs://b/run') / 'checkpoints') == 'gs://b/run/checkpoints'
  )
  assert str(files.path('run')) == os.path.join(os.getcwd(), 'run')
  with pytest.raises(ValueError, match='ram://x'):
    files.path('ram://x')  # epath does not open TF's in-memory filesystem


def test_files_functions(root):
  sub = files.join(root, 'sub')
  a = files.join(sub, 'a.json')
  assert not files.exists(sub)
  files.write_json(a, {'x': 1}, indent=1)  # creates the folder locally
  files.write_text(files.join(sub, 'b.txt'), 'one')
  files.write_text(files.join(sub, 'b.txt'), 'two')  # replaced whole
  files.write_bytes(files.join(sub, 'c.bin'), b'\x00\xff')
  assert files.read_json(a) == {'x': 1}
  assert files.read_text(files.join(sub, 'b.txt')) == 'two'
  assert files.read_bytes(files.join(sub, 'c.bin')) == b'\x00\xff'
  assert files.isdir(sub) and not files.isfile(sub)
  assert files.isfile(a) and not files.isdir(a)
  # No temporary file is left beside them.
  assert files.listdir(sub) == ['a.json', 'b.txt', 'c.bin']
  assert files.glob(files.join(sub, '*.json')) == [a]

  log = files.join(sub, 'metrics.jsonl')
  files.append_text(log, 'row 1\n')  # created
  files.append_text(log, 'row 2\n')
  assert files.read_text(log) == 'row 1\nrow 2\n'

  files.makedirs(files.join(root, 'x', 'y'))
  files.makedirs(files.join(root, 'x', 'y'))  # exists: nothing to do
  assert files.isdir(files.join(root, 'x', 'y'))

  files.rename(files.join(sub, 'b.txt'), files.join(sub, 'd.txt'))
  moved = sub
  if not files.is_remote(root):  # TF's ram:// renames files only
    moved = files.join(root, 'moved')
    files.rename(sub, moved)  # a folder and its files
    assert not files.exists(sub)
  assert files.listdir(moved) == ['a.json', 'c.bin', 'd.txt', 'metrics.jsonl']
  files.remove(files.join(moved, 'd.txt'))
  assert not files.exists(files.join(moved, 'd.txt'))

  image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
  png = files.join(moved, 'i.png')
  with files.open(png, 'wb') as f:
    Image.fromarray(image).save(f, format='PNG')
  np.testing.assert_array_equal(inference.read_image(png), image)

  missing = files.join(root, 'missing.txt')
  with pytest.raises(FileNotFoundError):
    files.read_text(missing)
  with pytest.raises(FileNotFoundError):
    files.remove(missing)
  with pytest.raises(FileNotFoundError):
    files.listdir(files.join(root, 'no-folder'))


def test_check_writable_local_and_ram(tmp_path):
  files.check_writable(str(tmp_path / 'new' / 'run'))  # creates nothing
  assert not (tmp_path / 'new').exists()
  (tmp_path / 'file').write_text('')
  with pytest.raises(PermissionError, match='file'):
    files.check_writable(str(tmp_path / 'file' / 'run'))
  root = f'ram://{uuid.uuid4().hex}/run'
  files.check_writable(root)
  assert files.glob(files.join(root, '*')) == []  # the probe is gone


def test_check_writable_names_the_credentials_fix(monkeypatch):
  def refuse(path, text):
    raise PermissionError(f'401 Unauthorized writing {path}')

  monkeypatch.setattr(files, 'write_text', refuse)
  with pytest.raises(PermissionError) as err:
    files.check_writable('gs://bucket/run')
  message = str(err.value)
  assert 'gs://bucket/run' in message and '401 Unauthorized' in message
  assert 'gcloud auth application-default login' in message
  assert 'GOOGLE_APPLICATION_CREDENTIALS' in message


def test_check_writable_gives_up_after_the_deadline(monkeypatch):
  release = threading.Event()
  monkeypatch.setattr(files, 'write_text', lambda *_: release.wait(30))
  try:
    with pytest.raises(PermissionError, match='no answer within'):
      files.check_writable('gs://bucket/run', timeout_s=0.2)
  finally:
    release.set()


def test_cli_gs_workdir_without_credentials_stops_before_compiling(tmp_path):
  env = dict(os.environ)
  env.pop('GOOGLE_APPLICATION_CREDENTIALS', None)
  env['CLOUDSDK_CONFIG'] = str(tmp_path)  # no gcloud credentials file
  workdir = 'gs://effdet-jax-no-such-bucket-0/run'
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'effdet_jax.main',
      '--config=configs/demo.py:test',
      f'--workdir={workdir}',
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode != 0
  assert f'cannot write to {workdir}' in proc.stderr
  assert 'gcloud auth application-default login' in proc.stderr
  output = (proc.stdout + proc.stderr).lower()
  assert 'compil' not in output and 'training steps' not in output


class _Recorder:
  """Stands in for an orbax CheckpointManager / StandardCheckpointer and
  records the directory it was handed."""

  handed: list = []

  def __init__(self, directory=None, *args, **kwargs):
    if directory is not None:
      self.handed.append(directory)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def save(self, directory, *args, **kwargs):
    self.handed.append(directory)

  def wait_until_finished(self):
    pass


def test_orbax_is_handed_the_url_as_an_epath(monkeypatch):
  monkeypatch.setattr(_Recorder, 'handed', [])
  monkeypatch.setattr(ocp, 'CheckpointManager', _Recorder)
  monkeypatch.setattr(ocp, 'StandardCheckpointer', _Recorder)
  written = []
  monkeypatch.setattr(files, 'makedirs', written.append)
  monkeypatch.setattr(files, 'write_json', lambda p, *a, **k: written.append(p))

  checkpoint.Checkpointer('gs://bucket/run', every_steps=3, keep=2)
  checkpoint.read_only_manager('gs://bucket/run')
  effdet_jax.save('gs://bucket/model', {'name': 'x'}, {})
  checkpoint.Checkpointer('relative/run', every_steps=3, keep=2)
  want = [
    'gs://bucket/run/checkpoints',
    'gs://bucket/run/checkpoints',
    'gs://bucket/model/variables',
    os.path.join(os.getcwd(), 'relative', 'run', 'checkpoints'),
  ]
  assert all(isinstance(d, epath.Path) for d in _Recorder.handed)
  assert [str(d) for d in _Recorder.handed] == want
  assert written == ['gs://bucket/model', 'gs://bucket/model/model_config.json']


@pytest.fixture
def orbax_local(tmp_path, monkeypatch):
  """Checkpoint folders of ram:// paths go to tmp_path/orbax (orbax cannot
  open ram://); every other file stays on ram://."""
  local = tmp_path / 'orbax'
  real_dir = checkpoint.checkpoint_dir
  real_saved = checkpoint.saved_variables_dir

  def on_disk(p):
    p = os.fspath(p)
    return str(local / p.split('://', 1)[1]) if files.is_remote(p) else p

  monkeypatch.setattr(
    checkpoint, 'checkpoint_dir', lambda p: real_dir(on_disk(p))
  )
  monkeypatch.setattr(
    checkpoint, 'saved_variables_dir', lambda p: real_saved(on_disk(p))
  )
  return local


def _assert_same_tree(a, b):
  a, b = jax.device_get(a), jax.device_get(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_whole_cycle_with_the_workdir_on_ram(orbax_local, tmp_path, capsys):
  from effdet_jax import main
  from effdet_jax.train import init_from
  from effdet_jax.train.trainer import Trainer, train_and_evaluate

  root = f'ram://{uuid.uuid4().hex}'
  workdir = files.join(root, 'run')
  config = config_files.load_module('demo').get_config('test')
  config.mesh.data = 1  # one of conftest's fake devices
  config.train.num_steps = 3  # checkpoint every 3 steps
  config.eval.draw_predictions = 2

  # Train 3 steps, then score that checkpoint as --mode=eval does.
  train_and_evaluate(config, workdir)
  # (orbax also keeps the first step of a run.)
  assert files.listdir(checkpoint.checkpoint_dir(workdir)) == ['1', '3']
  assert (
    files.read_json(files.join(workdir, 'config.json'))['train']['num_steps']
    == 3
  )
  assert files.isfile(files.join(workdir, api.MODEL_CONFIG_FILE))
  assert files.isfile(files.join(workdir, 'label_map.json'))
  assert not files.exists(files.join(workdir, 'run.lock'))  # released
  assert files.glob(files.join(workdir, 'events.out.tfevents.*'))
  at_3 = runner.evaluate_checkpoint(config, workdir)
  record = files.read_json(files.join(workdir, 'eval', 'step_3.json'))
  assert record['AP'] == pytest.approx(at_3['AP'])
  assert files.isfile(files.join(workdir, 'eval', 'detections_step_3.json'))

  # Resume to step 6: metrics.jsonl keeps the first run's rows.
  config.train.num_steps = 6
  state = train_and_evaluate(config, workdir)
  assert int(state.step) == 6
  rows = metrics.read_metrics(workdir)
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3, 4, 5, 6]
  assert [r['step'] for r in rows if 'eval/AP' in r] == [3]

  # effdet_jax.load of the ram:// workdir: the final EMA variables.
  loaded = effdet_jax.load(workdir)
  _assert_same_tree(loaded[1], state.variables(ema=True))

  # infer reads images from ram:// and writes its outputs there.
  images, out = files.join(root, 'images'), files.join(root, 'infer')
  rng = np.random.default_rng(0)
  for name in ('a.png', 'b.png'):
    with files.open(files.join(images, name), 'wb') as f:
      pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(f, format='PNG')
  predictor = inference.Predictor(
    loaded[0], loaded[1], loaded.config, batch_size=2, max_boxes=5
  )
  summary = infer.run(predictor, images, out, min_score=0.0)
  assert summary['processed'] == 2 and summary['skipped'] == []
  dets = files.read_json(files.join(out, 'detections.json'))
  assert {d['image_id'] for d in dets} == {'a.png', 'b.png'}
  assert files.listdir(out) == [
    'a.png',
    'b.png',
    'detections.json',
    'summary.json',
  ]

  # main's final report: the eval json found by a glob, drawn predictions.
  main._report(config, workdir)
  assert f'COCO metrics ({workdir}/eval/step_3.json)' in capsys.readouterr().out
  drawn = files.listdir(files.join(workdir, 'predictions'))
  assert len(drawn) == 2 and all(n.endswith('.png') for n in drawn)

  # init_from the ram:// workdir into a second one, and from a save.
  assert init_from.source_format(workdir) == 'workdir'
  second = files.join(root, 'second')
  config.init_from.path = workdir
  tr = Trainer(config, second, devices=jax.devices()[:1])
  started = init_from.initial_state(tr, config, second)
  _assert_same_tree(
    started.variables(ema=True)['params'], state.variables(ema=True)['params']
  )
  report = files.read_text(files.join(second, init_from.REPORT_FILE))
  assert report.startswith(f'init_from {workdir} (workdir')
  saved = files.join(root, 'saved')
  effdet_jax.save(saved, loaded.config, loaded[1])
  assert init_from.source_format(saved) == 'converted'
  _assert_same_tree(effdet_jax.load(saved)[1], loaded[1])

  # Only the redirected checkpoints reached the local disk.
  assert os.listdir(tmp_path) == ['orbax']
  assert not os.path.exists('ram:')  # os.path.abspath('ram://...')
