"""Where a host's training input stands: (epoch, offset), and how a stream
starts there without reading what came before.

A host's training stream is epoch 0, epoch 1, ... of its share of the data.
The order of epoch e is drawn from (data.seed, e) only, never from the
epochs before it, so the example at (e, o) is known without reading epochs
0..e-1, and the examples of epoch e before offset o are skipped as cheap
items (serialized records, indices) before any decoding. Resuming at step
200,000 costs what resuming at step 10 costs.

The trainer saves the position after the last example of the last trained
batch with every checkpoint (one per host), and restarts each host there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from effdet_jax.data.as_written import as_written

_EPOCHS = 2**40  # "forever" for tf.data.Dataset.range


@dataclasses.dataclass(frozen=True)
class Position:
  """The next example a host reads: offset `offset` of epoch `epoch`."""

  epoch: int = 0
  offset: int = 0

  def to_list(self) -> list[int]:
    return [int(self.epoch), int(self.offset)]

  @classmethod
  def after(cls, positions: np.ndarray) -> Position:
    """The position after the latest of `positions` ([N, 2] rows of a
    batch): where the next batch starts."""
    rows = np.asarray(positions, np.int64).reshape(-1, 2)
    epoch, offset = max(map(tuple, rows.tolist()))
    return cls(int(epoch), int(offset) + 1)


START = Position()


def epoch_seed(seed: int, epoch: tf.Tensor, salt: int) -> tf.Tensor:
  """An int64 shuffle seed drawn from (seed, epoch, salt): a different
  order every epoch, the same order whenever that epoch is read again."""
  key = tf.stack([tf.constant(int(seed) * 8 + salt, tf.int64), epoch])
  return tf.random.stateless_uniform(
    [], seed=key, minval=None, maxval=None, dtype=tf.int64
  )


def epochs(
  epoch: Callable[[tf.Tensor], tf.data.Dataset], start: Position = START
) -> tf.data.Dataset:
  """(position [2] int64, item) pairs of epoch(start.epoch) from
  start.offset, then of every later epoch from 0, forever.

  `epoch(e)` is a dataset of the cheap items of epoch e (a scalar int64
  tensor) in their order for that epoch.
  """
  first, skip_first = int(start.epoch), int(start.offset)

  def one(e):
    skip = tf.where(
      tf.equal(e, first),
      tf.constant(skip_first, tf.int64),
      tf.constant(0, tf.int64),
    )
    items = epoch(e).skip(skip).enumerate(start=skip)
    return items.map(
      as_written(lambda offset, item: (tf.stack([e, offset]), item))
    )

  return tf.data.Dataset.range(first, _EPOCHS).flat_map(as_written(one))


def to_payload(
  positions: Sequence[Position], host_batch: int
) -> dict[str, object]:
  """The JSON a checkpoint keeps: every host's position, in process order."""
  return {
    'process_count': len(positions),
    'host_batch_size': int(host_batch),
    'positions': [p.to_list() for p in positions],
  }


def from_payload(
  payload: dict, process_index: int, process_count: int
) -> tuple[Position, str | None]:
  """This host's saved position, and a warning when it is not exact.

  With another number of hosts the hosts' shares differ from the saved
  run's: every host then starts the earliest saved epoch from its start.
  """
  rows = payload['positions']
  if int(payload['process_count']) == process_count:
    epoch, offset = rows[process_index]
    return Position(int(epoch), int(offset)), None
  epoch = min(int(r[0]) for r in rows)
  return Position(epoch, 0), (
    f'the checkpoint was written by {payload["process_count"]} processes, '
    f'this run has {process_count}: the data order cannot continue exactly; '
    f'every host starts epoch {epoch} from its beginning'
  )
