"""The one file layer: every path effdet_jax reads or writes goes through here.

A path is a local path or a URL (`gs://bucket/run`, `s3://...`, TF's
in-memory `ram://...`): the workdir and everything in it (config.json,
label_map.json, metrics.jsonl, eval json, drawn predictions, error.log),
`init_from`, converter and `effdet_jax.save` outputs, `effdet_jax.load`,
and the tools' inputs and outputs. Checkpoints are written by orbax, which
is handed `path(p)` (an `epath.Path` that keeps a URL a URL).

Local paths use the standard library. URLs use `tf.io.gfile` (TensorFlow
is imported on the first URL only): it is what `etils.epath` itself runs
for gs:// when TensorFlow is installed (etils/epath/gpath.py,
`_GPath._backend`), and unlike `epath.Path` it also opens `ram://`, so the
tests exercise the same code on an in-memory filesystem. TensorFlow's
errors come out as the built-in ones (FileNotFoundError, FileExistsError,
PermissionError, OSError), as for local paths.

Writes:
- `write_text`, `write_bytes`, `write_json` replace a file whole and a
  concurrent reader never sees it half done: every process of a
  multi-process run checks the workdir's label map while process 0
  (re)writes it. Locally the data goes to a temporary file that is renamed
  over the target (atomic on POSIX); an object store write is already
  all-or-nothing. Missing local parent folders are created; object stores
  have none to create.
- `append_text` appends locally; object stores cannot append, and
  TensorFlow's appendable file there downloads the object and uploads it
  whole on close (read + rewrite: each append costs the file's size, and a
  second writer's rows between the two would be lost). Fine for what uses
  it: metrics.jsonl, a row per log step written by process 0 only, and
  error.log.
"""

from __future__ import annotations

import builtins
import contextlib
import glob as glob_lib
import json
import os
import posixpath
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import IO, Any

from etils import epath

PathLike = str | os.PathLike

# How long `check_writable` waits for an object store (a credential lookup
# or an unreachable endpoint can retry for minutes).
PROBE_TIMEOUT_S = 60.0


def is_remote(p: PathLike) -> bool:
  """True for a URL (`gs://...`, `ram://...`), False for a local path."""
  return '://' in os.fspath(p)


def absolute(p: PathLike) -> str:
  """A local path made absolute; a URL as it is (`os.path.abspath` would
  turn `gs://b/run` into `<cwd>/gs:/b/run`)."""
  p = os.fspath(p)
  return p if is_remote(p) else os.path.abspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as the `epath.Path` orbax takes (local paths made absolute).

  Raises ValueError for a URL scheme epath does not open (it opens gs://,
  s3://, az://, hf://; not TensorFlow's ram://).
  """
  try:
    return epath.Path(absolute(p))
  except KeyError:
    raise ValueError(
      f'{p}: orbax (etils.epath) cannot open this kind of URL; checkpoints '
      'need a local path or gs://, s3://, az://, hf://'
    ) from None


def join(p: PathLike, *parts: str) -> str:
  """`os.path.join` for local paths, '/'-joined for a URL."""
  p = os.fspath(p)
  return posixpath.join(p, *parts) if is_remote(p) else os.path.join(p, *parts)


def _tf():
  import tensorflow as tf  # noqa: PLC0415 - slow import, URLs only

  return tf


@contextlib.contextmanager
def _remote_errors(p: PathLike) -> Iterator[None]:
  """TensorFlow's file errors on `p` as the built-in ones."""
  errors = _tf().errors
  try:
    yield
  except errors.OpError as err:
    message = err.message or f'{type(err).__name__} on {os.fspath(p)}'
    if isinstance(err, errors.NotFoundError):
      raise FileNotFoundError(message) from None
    if isinstance(err, errors.AlreadyExistsError):
      raise FileExistsError(message) from None
    if isinstance(
      err, (errors.PermissionDeniedError, errors.UnauthenticatedError)
    ):
      raise PermissionError(message) from None
    raise OSError(f'{type(err).__name__}: {message}') from None


def exists(p: PathLike) -> bool:
  """True when file or folder `p` exists."""
  if not is_remote(p):
    return os.path.exists(p)
  with _remote_errors(p):
    return _tf().io.gfile.exists(os.fspath(p))


def isdir(p: PathLike) -> bool:
  """True for a folder (on object stores: a prefix with objects under it)."""
  if not is_remote(p):
    return os.path.isdir(p)
  with _remote_errors(p):
    return _tf().io.gfile.isdir(os.fspath(p))


def isfile(p: PathLike) -> bool:
  """True for a file (an object), False for a folder or nothing."""
  if not is_remote(p):
    return os.path.isfile(p)
  return exists(p) and not isdir(p)


def makedirs(p: PathLike) -> None:
  """Creates folder `p` and its parents; nothing if it exists."""
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)
    return
  with _remote_errors(p):
    _tf().io.gfile.makedirs(os.fspath(p))


def listdir(p: PathLike) -> list[str]:
  """The names (not paths) in folder `p`, sorted."""
  if not is_remote(p):
    return sorted(os.listdir(p))
  with _remote_errors(p):
    return sorted(_tf().io.gfile.listdir(os.fspath(p)))


def glob(pattern: PathLike) -> list[str]:
  """Paths matching `pattern` (`*`, `?`, `[...]`), sorted."""
  if not is_remote(pattern):
    return sorted(glob_lib.glob(os.fspath(pattern)))
  with _remote_errors(pattern):
    return sorted(_tf().io.gfile.glob(os.fspath(pattern)))


def rename(src: PathLike, dst: PathLike) -> None:
  """Moves a file or folder (on gs://: every object under it; TF's ram://
  moves files only)."""
  if not is_remote(src):
    os.rename(src, dst)
    return
  with _remote_errors(src):
    _tf().io.gfile.rename(os.fspath(src), os.fspath(dst))


def remove(p: PathLike) -> None:
  """Deletes file `p` (FileNotFoundError when there is none)."""
  if not is_remote(p):
    os.remove(p)
    return
  with _remote_errors(p):
    _tf().io.gfile.remove(os.fspath(p))


@contextlib.contextmanager
def open(p: PathLike, mode: str = 'rb') -> Iterator[IO]:
  """`with files.open(p, 'rb') as f:` a stream for PIL, h5py, json...

  Modes 'r', 'w', 'a' with 'b' or not. A 'w' stream on an object store is
  uploaded on close; use `write_*` for files that readers may see mid-write.
  """
  if not is_remote(p):
    with builtins.open(p, mode) as f:
      yield f
    return
  with _remote_errors(p), _tf().io.gfile.GFile(os.fspath(p), mode) as f:
    yield f


def read_bytes(p: PathLike) -> bytes:
  """The whole file."""
  with open(p, 'rb') as f:
    return f.read()


def read_text(p: PathLike) -> str:
  """The whole file, decoded as UTF-8."""
  return read_bytes(p).decode('utf-8')


def read_json(p: PathLike) -> Any:
  """The JSON value in the file."""
  return json.loads(read_text(p))


def write_bytes(p: PathLike, data: bytes) -> None:
  """Replaces `p` with `data`, atomically (module docstring)."""
  if is_remote(p):
    if os.fspath(p).startswith('ram://') and exists(p):
      # TF's in-memory filesystem (tests) writes over an existing file
      # without truncating it (tsl/platform/ram_file_system.h:
      # NewWritableFile); object stores replace the object whole.
      remove(p)
    with open(p, 'wb') as f:
      f.write(data)
    return
  directory = os.path.dirname(absolute(p))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.part')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, p)
  except BaseException:
    os.unlink(tmp)
    raise


def write_text(p: PathLike, text: str) -> None:
  """Replaces `p` with `text` (UTF-8), atomically (module docstring)."""
  write_bytes(p, text.encode('utf-8'))


def write_json(p: PathLike, obj: Any, **dump_kwargs: Any) -> None:
  """`write_text(p, json.dumps(obj, **dump_kwargs))`."""
  write_text(p, json.dumps(obj, **dump_kwargs))


def append_text(p: PathLike, text: str) -> None:
  """Appends `text` to `p` (created if absent); on an object store by read
  and rewrite (module docstring): one writer only."""
  with open(p, 'a') as f:
    f.write(text)


def check_writable(p: PathLike, timeout_s: float = PROBE_TIMEOUT_S) -> None:
  """Raises PermissionError, naming `p` and how to fix it, when files
  cannot be written in folder `p` (which need not exist yet).

  A URL gets a probe object written, read back and deleted, given up after
  `timeout_s` (a credential lookup or an unreachable endpoint may retry for
  minutes). A local path is checked on its nearest existing folder (write
  permission); nothing is created.
  """
  p = absolute(p)
  if not is_remote(p):
    parent = p
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
      raise PermissionError(
        f'cannot create files in {p}: {parent} is not a '
        'folder this user can write to'
      )
    return
  probe = join(p, f'.effdet_jax-probe-{socket.gethostname()}-{os.getpid()}')
  outcome: list[BaseException | None] = []

  def run() -> None:
    try:
      write_text(probe, 'probe')
      if read_text(probe) != 'probe':
        raise OSError(f'{probe} read back differs from what was written')
      remove(probe)
      outcome.append(None)
    except BaseException as err:  # noqa: BLE001 - reported below
      outcome.append(err)

  thread = threading.Thread(target=run, name='effdet_jax-probe', daemon=True)
  thread.start()
  thread.join(timeout_s)
  if outcome and outcome[0] is None:
    return
  if outcome:
    err = outcome[0]
    first = (str(err).strip().splitlines() or [''])[0]
    reason = f'{type(err).__name__}: {first}'
  else:
    reason = f'no answer within {timeout_s:.0f} s'
  hint = ''
  if p.startswith('gs://'):
    hint = (
      ' A gs:// path needs Google Cloud credentials that may write to the '
      'bucket: run `gcloud auth application-default login`, or set '
      'GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (a '
      "TPU/GCE VM uses its service account: give it the bucket's "
      'Storage Object Admin role).'
    )
  raise PermissionError(f'cannot write to {p} ({reason}).{hint}')
