"""The input pipelines are traced without AutoGraph (data/as_written.py),
and give the same batches as with it.

AutoGraph rewrites Python control flow on tensors into graph ops; the
input code writes `tf.cond` / `tf.where` itself (as the official
`efficientdet/dataloader.py` and `efficientdet/aug/autoaugment.py` do),
so turning the rewrite off must change no batch: checked for the
synthetic, TFRecord and COCO-json sources and the policies v0-v3.
"""

import numpy as np
import pytest
from conftest import shared_path
from tensorflow.python.autograph.impl import api as autograph_api

from effdet_jax.data import pipeline, position, sources, testing

_MODULES = (pipeline, position, sources)


def _coco16(**kw):
  json_path = shared_path(
    'oracle', 'official-tfrecord-coco16', 'annotations.json'
  )
  images = shared_path('data', 'coco128', 'images')
  return dict(
    source='coco_json',
    train_json=str(json_path),
    train_images=str(images),
    eval_json=str(json_path),
    eval_images=str(images),
    **kw,
  )


def _tfrecord(**kw):
  root = shared_path('oracle', 'official-tfrecord-coco16')
  pattern = str(root / 'coco16-*.tfrecord')
  return dict(source='tfrecord', train_pattern=pattern, eval_pattern=pattern)


_POLICY = pytest.mark.slow  # AutoGraph converts each policy for seconds
CASES = {
  'synthetic': lambda: dict(source='synthetic'),
  'tfrecord': _tfrecord,
  'coco_json': _coco16,
}
POLICIES = ('v0', 'v1', 'v2', 'v3')


def _batches(config) -> list[dict]:
  train = pipeline.train_dataset(config).as_numpy_iterator()
  out = [next(train) for _ in range(2)]
  out.append(next(pipeline.eval_dataset(config).as_numpy_iterator()))
  return out


@pytest.mark.parametrize(
  'case, policy',
  [(c, '') for c in sorted(CASES)]
  + [pytest.param('synthetic', p, marks=_POLICY) for p in POLICIES],
)
def test_same_batches_without_autograph(case, policy, monkeypatch):
  config = testing.small_config(image_size=(64, 64), batch_size=2)
  for key, value in CASES[case]().items():
    config.data[key] = value
  config.data.autoaugment_policy = policy
  converted_fns = []
  convert = autograph_api._convert_actual

  def counted(entity, *args, **kwargs):
    converted_fns.append(getattr(entity, '__qualname__', repr(entity)))
    return convert(entity, *args, **kwargs)

  monkeypatch.setattr(autograph_api, '_convert_actual', counted)
  plain = _batches(config)
  assert converted_fns == []  # AutoGraph converted no input function

  # With AutoGraph's rewrite, as tf.data does by default.
  for module in _MODULES:
    monkeypatch.setattr(module, 'as_written', lambda fn: fn)
  converted = _batches(config)
  assert converted_fns  # the probe sees a conversion when there is one
  for a, b in zip(plain, converted, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
