"""Train and eval tf.data pipelines, and host batch -> global jax.Array.

    source (this host's files / examples; training: epochs in an order
    drawn from (seed, epoch), each example with its position) -> load +
    check (decode, count bad input) -> preprocess (training: seeded by
    the example's position) -> batch -> prefetch

A batch is a dict of numpy arrays with static shapes, so one compiled step
serves every batch: image [B,H,W,3] f32, boxes [B,M,4] yxyx pixels of the
network input (-1 padded), classes [B,M] int32 1-based (-1 padded),
image_id [B] int32, image_scale [B] f32 (original pixels per input pixel),
image_size [B,2] int32 (original H, W), is_crowd [B,M] int32, area [B,M]
f32; training batches add position [B,2] int64 (epoch, offset: where each
example stands in its host's stream, data/position.py), eval batches valid
[B] bool (False for the padding examples). B is the per-host batch: the
configured global batch / jax.process_count().
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf

from effdet_jax.data import checks, position, preprocess, sources
from effdet_jax.data.as_written import as_written


def _host(process_index, process_count) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  return process_index, process_count


def host_batch_size(global_batch_size: int, process_count: int) -> int:
  """The per-host share of a global batch (must divide evenly)."""
  if global_batch_size % process_count:
    raise ValueError(
      f'global batch {global_batch_size} is not divisible by '
      f'{process_count} processes'
    )
  return global_batch_size // process_count


def _parallel(config: Any) -> int:
  n = int(config.data.num_parallel_calls)
  return tf.data.AUTOTUNE if n < 0 else n


def _options(config: Any) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = bool(config.data.deterministic)
  # One thread per op: many examples in parallel beat parallel kernels.
  options.threading.max_intra_op_parallelism = 1
  return options


def examples(
  config: Any,
  split: str,
  *,
  stats: checks.DataStats | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  start: position.Position = position.START,
) -> tf.data.Dataset:
  """(position, example) pairs: decoded, checked, not yet preprocessed.

  Training positions are [2] (epoch, offset) from `start` on; eval
  positions count the split's examples. Training examples have their crowd
  boxes removed (official skip_crowd_during_training).
  """
  pi, pc = _host(process_index, process_count)
  data = config.data
  training = split == 'train'
  stats = stats or checks.DataStats(
    strict=data.strict,
    max_consecutive_skips=(
      int(data.get('max_consecutive_skips', 0)) if training else 0
    ),
  )
  if training:
    ds = sources.train_examples(config, pi, pc, start)
  else:
    ds = sources.raw_examples(config, split, pi, pc).enumerate()
  if data.source != 'synthetic':
    load = lambda i, ex: (  # noqa: E731
      i,
      checks.load_and_check(
        ex,
        stats=stats,
        num_classes=int(config.model.num_classes),
        drop_crowd=training and bool(data.skip_crowd_during_training),
        max_instances=int(data.max_instances_per_image),
      ),
    )
    ds = ds.map(as_written(load), num_parallel_calls=_parallel(config))
    ds = ds.filter(as_written(lambda i, ex: ex['ok']))
  return ds.with_options(_options(config))


def _example_seed(config: Any, process_index: int, where) -> tf.Tensor:
  """The augmentation seed of the example at `where` = (epoch, offset)."""
  key = tf.constant([config.data.seed, process_index], tf.int64)
  key = tf.random.experimental.stateless_fold_in(key, where[0])
  return tf.random.experimental.stateless_fold_in(key, where[1])


def train_dataset(
  config: Any,
  *,
  stats: checks.DataStats | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  start: position.Position = position.START,
) -> tf.data.Dataset:
  """Infinite per-host training batches (augmented, drop_remainder) from
  the stream position `start`."""
  pi, pc = _host(process_index, process_count)
  params = preprocess.Params.from_config(config)
  batch = host_batch_size(int(config.train.batch_size), pc)
  ds = examples(
    config,
    'train',
    stats=stats,
    process_index=pi,
    process_count=pc,
    start=start,
  )
  ds = ds.map(
    as_written(
      lambda where, ex: dict(
        preprocess.train_preprocess(
          ex, _example_seed(config, pi, where), params
        ),
        position=where,
      )
    ),
    num_parallel_calls=_parallel(config),
  )
  ds = ds.batch(batch, drop_remainder=True)
  return ds.prefetch(int(config.data.prefetch_batches))


def _padding_example(params: preprocess.Params) -> dict[str, tf.Tensor]:
  h, w = params.image_size
  m = params.max_instances
  return {
    'image': tf.zeros([h, w, 3], tf.float32),
    'boxes': -tf.ones([m, 4], tf.float32),
    'classes': -tf.ones([m], tf.int32),
    'image_id': tf.constant(-1, tf.int32),
    'image_scale': tf.constant(1.0, tf.float32),
    'image_size': tf.zeros([2], tf.int32),
    'is_crowd': tf.zeros([m], tf.int32),
    'area': -tf.ones([m], tf.float32),
    'valid': tf.constant(False),
  }


def eval_dataset(
  config: Any,
  *,
  num_batches: int | None = None,
  stats: checks.DataStats | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> tf.data.Dataset:
  """Per-host eval batches, every example once, in order.

  The last batch is filled with padding examples (valid=False). With
  `num_batches`, exactly that many batches (padding after the data runs
  out), so every host runs the same number of steps.
  """
  pi, pc = _host(process_index, process_count)
  params = preprocess.Params.from_config(config)
  batch = host_batch_size(int(config.eval.batch_size), pc)
  ds = examples(config, 'eval', stats=stats, process_index=pi, process_count=pc)
  ds = ds.map(
    as_written(
      lambda i, ex: dict(preprocess.eval_preprocess(ex, params), valid=True)
    ),
    num_parallel_calls=_parallel(config),
  )
  pad = tf.data.Dataset.from_tensors(_padding_example(params))
  if num_batches is None:
    ds = ds.concatenate(pad.repeat(batch - 1))
    ds = ds.batch(batch, drop_remainder=True)
  else:
    ds = ds.concatenate(pad.repeat()).batch(batch, drop_remainder=True)
    ds = ds.take(num_batches)
  return ds.prefetch(int(config.data.prefetch_batches))


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding):
  """A host batch -> global jax.Arrays (leading dim split over hosts, in
  the sharding's fixed device order)."""
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
    batch,
  )


def global_batches(
  dataset: Iterable, sharding: jax.sharding.Sharding
) -> Iterator[dict[str, jax.Array]]:
  """Iterates a batched tf.data dataset as global jax.Array dicts."""
  it = (
    dataset.as_numpy_iterator()
    if hasattr(dataset, 'as_numpy_iterator')
    else dataset
  )
  for batch in it:
    yield to_global(batch, sharding)
