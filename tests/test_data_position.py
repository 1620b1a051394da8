"""The training input restarts at a saved (epoch, offset) without reading
what came before it (data/position.py), and gives the same batches as the
stream read from its start."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import shared_path

from effdet_jax.data import checks, pipeline, position, testing


def _take(ds, n):
  it = ds.as_numpy_iterator()
  return [next(it) for _ in range(n)]


def _tfrecord_config():
  root = shared_path('oracle', 'official-tfrecord-coco16')
  return testing.small_config(
    image_size=(64, 64),
    batch_size=2,
    source='tfrecord',
    train_pattern=str(root / 'coco16-*.tfrecord'),
    shuffle_buffer_size=4,
    cycle_length=2,
  )


def _coco_json_config():
  root = shared_path('data', 'coco128')
  return testing.small_config(
    image_size=(64, 64),
    batch_size=8,
    source='coco_json',
    train_json=str(root / 'annotations.json'),
    train_images=str(root / 'images'),
  )


def _synthetic_config():
  return testing.small_config(
    image_size=(64, 64),
    batch_size=4,
    source='synthetic',
    synthetic_train_size=24,
    synthetic_image_size=(64, 64),
  )


CONFIGS = {
  'tfrecord': _tfrecord_config,
  'coco_json': _coco_json_config,
  'synthetic': _synthetic_config,
}


@pytest.mark.parametrize('source', sorted(CONFIGS))
@pytest.mark.parametrize('host', [(0, 1), (1, 2)], ids=['1host', 'host1of2'])
@pytest.mark.slow
def test_start_at_a_saved_position_equals_reading_from_the_start(source, host):
  config = CONFIGS[source]()
  config.model.num_classes = 90
  pi, pc = host
  kw = dict(process_index=pi, process_count=pc)
  full = _take(pipeline.train_dataset(config, **kw), 40)
  rows = np.concatenate([b['position'] for b in full])
  ids = np.concatenate([b['image_id'] for b in full])
  assert rows[-1][0] >= 2, rows[-1]  # several epochs
  e0, e1 = (ids[rows[:, 0] == e].tolist() for e in (0, 1))
  assert sorted(e0) == sorted(e1)
  if source == 'synthetic':  # the index order, every epoch
    assert e0 == e1
  else:  # each epoch its own order, drawn from (seed, epoch)
    assert e0 != e1
  # Resume after batches ending mid-epoch and at an epoch's end.
  for k in (3, 10, 15, 33):
    start = position.Position.after(full[k]['position'])
    again = _take(pipeline.train_dataset(config, start=start, **kw), 4)
    for want, got in zip(full[k + 1 : k + 5], again, strict=True):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_the_skipped_examples_are_not_decoded(tmp_path):
  """Records before the start are corrupt: a resume that decoded them
  would count them as bad (or, strict, fail); this one never sees them."""
  from effdet_jax.data import create_tfrecord, tfrecord_format

  good = tf.io.encode_jpeg(tf.zeros([32, 32, 3], tf.uint8)).numpy()

  def record(i, encoded):
    return tfrecord_format.make_example(
      encoded=encoded,
      image_format='jpeg',
      filename=f'{i}.jpg',
      source_id=str(i + 1),
      height=32,
      width=32,
      objects={
        'ymin': [0.1],
        'xmin': [0.1],
        'ymax': [0.6],
        'xmax': [0.6],
        'text': [b'a'],
        'label': [1],
      },
    )

  # One file, no shuffle buffer: the epoch order is the file order.
  records = [record(i, b'not a jpeg') for i in range(6)]
  records += [record(i, good) for i in range(6, 10)]
  create_tfrecord.write_shards(iter(records), str(tmp_path / 'r'), 1)
  config = testing.small_config(
    image_size=(32, 32),
    batch_size=2,
    source='tfrecord',
    train_pattern=str(tmp_path / 'r-*.tfrecord'),
    shuffle_buffer_size=0,
    strict=True,
  )
  config.model.num_classes = 3
  stats = checks.DataStats(strict=True)
  batch = _take(
    pipeline.train_dataset(config, stats=stats, start=position.Position(0, 6)),
    1,
  )[0]
  assert batch['image_id'].tolist() == [7, 8]
  assert batch['position'].tolist() == [[0, 6], [0, 7]]
  assert stats.summary() == checks.DataStats(strict=True).summary()
  # Read from the start, strict mode stops at the first corrupt record.
  with pytest.raises(Exception, match='(?i)decode|image|corrupt'):
    _take(
      pipeline.train_dataset(config, stats=checks.DataStats(strict=True)), 1
    )


def test_payload_round_trip_and_a_changed_host_count():
  payload = position.to_payload(
    [position.Position(3, 17), position.Position(3, 15)], host_batch=8
  )
  assert position.from_payload(payload, 1, 2) == (
    position.Position(3, 15),
    None,
  )
  start, warning = position.from_payload(payload, 0, 4)
  assert start == position.Position(3, 0)
  assert '2 processes' in warning and 'epoch 3' in warning
  assert position.Position.after(np.array([[2, 9], [3, 0], [2, 11]])) == (
    position.Position(3, 1)
  )
