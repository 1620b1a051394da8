"""Where the time to the first training step goes, in one start-up line.

    start-up 45.6 s to step 1: imports 6.8, setup 1.2, init 11.8, data 2.1,
    compile 23.3, first step 0.4

Phases are marked in order by the trainer; each is the time since the
previous mark, the first since the process started (read from /proc on
Linux, so it includes the interpreter, the imports and a malloc-tuning
re-exec; elsewhere, since this module was imported).
"""

from __future__ import annotations

import os
import time


def _process_start() -> float:
  """The process start as a time.time() value (Linux), else now."""
  try:
    with open('/proc/self/stat') as f:
      # Field 22 (after the parenthesised command name): start time in
      # clock ticks since boot.
      ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/stat') as f:
      boot = next(int(x.split()[1]) for x in f if x.startswith('btime'))
    return boot + ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError, StopIteration):
    return time.time()


class StartupTimer:
  """`mark(name)` at the end of each phase; `line()` to report them."""

  def __init__(self, start: float | None = None):
    self.start = _process_start() if start is None else start
    self._last = self.start
    self.phases: list[tuple[str, float]] = []

  def mark(self, name: str) -> float:
    now = time.time()
    seconds = max(now - self._last, 0.0)
    self.phases.append((name, seconds))
    self._last = now
    return seconds

  def total(self) -> float:
    return sum(s for _, s in self.phases)

  def line(self, step: int) -> str:
    parts = ', '.join(f'{name} {s:.1f}' for name, s in self.phases)
    return f'start-up {self.total():.1f} s to step {step}: {parts}'
