"""Whole-file writes that a concurrent reader never sees half done.

Every process of a multi-process run starts by checking the workdir's label
map while process 0 (re)writes it; a plain `write_text` truncates first, so a
reader could parse an empty file and stop its process, which the others then
meet as a collective timeout. Locally the text goes to a temporary file that
is renamed over the target (atomic on POSIX); on object stores (gs://) a
write is already all-or-nothing.
"""

from __future__ import annotations

import os
import tempfile


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` (a local path or a URL) atomically."""
  if '://' in str(path):
    from etils import epath  # noqa: PLC0415

    epath.Path(path).write_text(text)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.part')
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
