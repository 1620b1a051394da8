"""Training batches pulled by a background thread, waited on with a timeout.

Python runs signal handlers in the main thread only, between bytecodes: a
main thread blocked inside tf.data's `next()` (a stalled file system, an
input that skips every record) would never see SIGTERM or Ctrl-C. Here a
daemon thread pulls the batches into a small queue and the main thread waits
on the queue in short slices, asking `stop()` between them, so a signal is
acted on within `poll_s` whatever the input does. The batches and their
order are the iterator's, unchanged.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_END = object()


class InputStopped(Exception):
  """`next_batch` returned because `stop()` became true while waiting."""


class InputFeed:
  """Iterates `batches` in a daemon thread, `depth` batches ahead."""

  def __init__(self, batches: Iterator[Any], depth: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._batches = batches
    self._closed = threading.Event()
    self._thread = threading.Thread(
      target=self._run, name='effdet_jax-input', daemon=True
    )
    self._thread.start()

  def _put(self, item: Any) -> bool:
    while not self._closed.is_set():
      try:
        self._queue.put(item, timeout=0.5)
        return True
      except queue.Full:
        continue
    return False

  def _run(self) -> None:
    try:
      for batch in self._batches:
        if not self._put(batch):
          return
      self._put(_END)
    except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
      self._put(err)

  def next_batch(
    self, stop: Callable[[], bool] = lambda: False, poll_s: float = 0.5
  ) -> Any:
    """The next batch; raises StopIteration at the end, the input's own
    error if it failed, InputStopped if `stop()` turned true meanwhile."""
    while True:
      try:
        item = self._queue.get(timeout=poll_s)
      except queue.Empty:
        if stop():
          raise InputStopped from None
        continue
      if item is _END:
        raise StopIteration
      if isinstance(item, BaseException):
        raise item
      return item

  def close(self) -> None:
    """Lets the thread end at its next batch (it is a daemon: a thread
    blocked inside the input does not keep the process alive)."""
    self._closed.set()
