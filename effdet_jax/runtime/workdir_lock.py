"""One run per workdir: `WORKDIR/run.lock` names the host and pid holding it.

A second run on the same workdir (a second launch, a forgotten terminal)
would interleave `metrics.jsonl` and fight over the checkpoints; it stops at
start-up instead, before any compile, naming who holds the lock. The lock is
released on exit. A lock is stale, and taken over with a warning, when its
process is gone (same host: the pid is not running) or when its holder on
another host has not refreshed it for `stale_after_s` (a running trainer
refreshes it at most once a minute as it logs). A multi-host run holds it
once, through process 0, and every process gets the same verdict.

Locally the file is created with O_EXCL (atomic: the lock itself); on
object stores (gs://, through files.py) the check-then-write is not atomic,
which only matters for two runs started within the same second.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import jax
import numpy as np

from effdet_jax import files

LOCK_FILE = 'run.lock'
REFRESH_S = 60.0


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir): train...` (see the module docstring)."""

  def __init__(self, workdir: str, stale_after_s: float = 900.0):
    self.workdir = workdir
    self.path = files.join(workdir, LOCK_FILE)
    self.stale_after_s = stale_after_s
    self._held = False
    self._last_refresh = 0.0
    self._record = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
    }

  # -- process 0 ---------------------------------------------------------
  def _read(self) -> dict | None:
    try:
      return files.read_json(self.path)
    except FileNotFoundError:
      return None
    except (ValueError, OSError):  # half-written or garbage: stale
      return {}

  def _write(self, exclusive: bool) -> bool:
    record = dict(self._record, refreshed=time.time())
    text = json.dumps(record)
    if files.is_remote(self.path):
      files.write_text(self.path, text)
      return True
    files.makedirs(self.workdir)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    try:
      fd = os.open(self.path, flags, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return True

  def _stale_reason(self, holder: dict) -> str | None:
    """Why `holder`'s lock may be taken over, or None if it is live."""
    if not holder:
      return 'unreadable lock file'
    if holder.get('host') == self._record['host']:
      if not _pid_alive(int(holder.get('pid', -1))):
        return f'pid {holder.get("pid")} is not running'
      return None
    age = time.time() - float(holder.get('refreshed', 0))
    if age > self.stale_after_s:
      return f'not refreshed for {age:.0f} s'
    return None

  def _acquire_local(self) -> str | None:
    """Takes the lock; returns an error message instead if it is held."""
    if not files.is_remote(self.path) and self._write(exclusive=True):
      return None
    holder = self._read()
    if holder is None:  # released meanwhile
      return None if self._write(exclusive=True) else self._acquire_local()
    reason = self._stale_reason(holder)
    if reason is None:
      age = time.time() - float(holder.get('refreshed', 0))
      return (
        f'workdir {self.workdir} is in use by the run on host '
        f'{holder.get("host")} pid {holder.get("pid")} (started '
        f'{holder.get("started")}, lock refreshed {age:.0f} s ago). Stop '
        f'that run, use another --workdir, or delete {self.path} if that '
        'run is gone.'
      )
    logging.warning(
      'taking over the stale lock %s (%s: %s)', self.path, reason, holder
    )
    self._write(exclusive=False)
    return None

  # -- every process -------------------------------------------------------
  def acquire(self) -> None:
    message = self._acquire_local() if jax.process_index() == 0 else None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      held = multihost_utils.broadcast_one_to_all(np.int32(message is not None))
      if int(held) and message is None:
        message = f'workdir {self.workdir} is in use by '
        message += 'another run (see process 0)'
    if message:
      raise WorkdirLockedError(message)
    self._held = jax.process_index() == 0
    self._last_refresh = time.time()

  def refresh(self) -> None:
    """Marks the lock live (cheap; writes at most once a minute)."""
    if self._held and time.time() - self._last_refresh >= REFRESH_S:
      self._last_refresh = time.time()
      try:
        self._write(exclusive=False)
      except OSError as err:  # a full disk must not stop training here
        logging.warning('could not refresh %s: %s', self.path, err)

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    try:
      holder = self._read()
      if holder and holder.get('pid') == self._record['pid']:
        files.remove(self.path)
    except OSError as err:
      logging.warning('could not remove %s: %s', self.path, err)

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
