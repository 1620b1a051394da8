"""Functions handed to tf.data, traced as written (no AutoGraph).

`Dataset.map`, `filter`, `interleave` and `flat_map` run AutoGraph on the
function they get: it re-parses the Python source of that function and of
everything it calls, and rewrites the control flow into graph ops. The
input code of this package writes its graph control flow itself
(`tf.cond`, `tf.where`, `tf.switch_case`, as the official
`efficientdet/dataloader.py` and `efficientdet/aug/autoaugment.py` do),
so the rewrite changes nothing but costs time: building the D0 training
pipeline took 1.7-2.3 s with it and 0.5-0.7 s without, the same batches
bit for bit, paid by every run at start-up and by every evaluation
pipeline. A Python `if` or `while` on a
tensor in a function marked here fails at trace time ("using a tf.Tensor
as a Python bool is not allowed") instead of being converted silently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import tensorflow as tf

F = TypeVar('F', bound=Callable)


def as_written(fn: F) -> F:
  """`fn`, marked for tf.data to trace without AutoGraph conversion."""
  return tf.autograph.experimental.do_not_convert(fn)
