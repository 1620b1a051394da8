"""Shared fixtures. Tests run on the CPU; 8 fake devices for mesh tests."""

import os
import pathlib

# LLVM at -O0 for the XLA:CPU programs the tests compile: they are tiny
# models run for a few steps, so compiling dominates; -O0 compiles in about
# 0.6x the time (the C++ kernels are prebuilt and unaffected) and every
# test's tolerance holds.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process with `devices` fake CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}'


os.environ.setdefault('XLA_FLAGS', xla_flags(8))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# One persistent compilation cache for the test processes, the xdist workers
# and the CLI runs they start: the same programs (the tiny training step,
# the D0 forward) compile once per run instead of once per process.
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR',
  str(
    pathlib.Path(__file__).resolve().parents[1]
    / '.pytest_cache'
    / 'jax_compilation_cache'
  ),
)

# Subprocesses (xdist workers, the CLI runs tests start) inherit the glibc
# malloc tunables that `python -m effdet_jax.main` re-executes itself with:
# XLA:CPU steps run ~1.5x faster without per-step mmap/munmap page faults.
from effdet_jax.cpu import malloc_tuning  # noqa: E402

if malloc_tuning.applies():
  os.environ.update(malloc_tuning.tuned_env())

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'


def shared_dir() -> pathlib.Path:
  """The read-only project share: $EFFDET_JAX_SHARED if set, else ../shared.

  `../shared` is relative to the repository root. There is no other
  fallback: a clone elsewhere (e.g. a CI checkout) sets EFFDET_JAX_SHARED.
  Tests reach the files through `shared_path`, never by testing this
  directory themselves, so that one rule decides skip or fail.
  """
  env = os.environ.get('EFFDET_JAX_SHARED')
  return pathlib.Path(env) if env else SHARED


def in_ci() -> bool:
  """CI=true (as GitHub Actions and `.ci/run` set it)."""
  return os.environ.get('CI', '').strip().lower() == 'true'


def shared_path(*parts: str) -> pathlib.Path:
  """`shared_dir() / parts`, which must exist for the calling test.

  Missing, it fails the test under CI=true (CI must not go green by
  skipping the official-parity tests) and skips it otherwise; either way
  the message names the path tried and where the share came from.
  """
  root = shared_dir()
  path = root.joinpath(*parts)
  if path.exists():
    return path
  if os.environ.get('EFFDET_JAX_SHARED'):
    origin = f'$EFFDET_JAX_SHARED={root}'
  else:
    origin = f'../shared next to the repository = {root}, '
    origin += '$EFFDET_JAX_SHARED unset'
  message = f'shared fixture not found: tried {path} (share: {origin})'
  if in_ci():
    pytest.fail(f'{message}; CI=true: a missing fixture fails', pytrace=False)
  pytest.skip(message)


@pytest.fixture(scope='session')
def oracle_dir() -> pathlib.Path:
  return shared_path('oracle', 'official-d0-256')


@pytest.fixture(scope='session')
def official_counts() -> dict:
  import json

  path = shared_path('reference', 'official-counts.json')
  return json.loads(path.read_text())
