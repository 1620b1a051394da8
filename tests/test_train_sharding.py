"""One sharded step equals the same step on one device (global-batch BN)."""

import jax
import numpy as np
import pytest
from train_utils import fixed_batch, tiny_config

from effdet_jax import api, ops
from effdet_jax.train.trainer import Trainer


def _one_step(config, devices, tmp_path):
  tr = Trainer(config, str(tmp_path), devices=devices)
  batch = fixed_batch(config)
  state = tr.fresh_state()
  before = jax.device_get(state.params)
  sh = tr.batch_sharding(batch)
  gbatch = {k: jax.device_put(v, sh[k]) for k, v in batch.items()}
  # The step the trainer runs (packed state).
  new, metrics = tr.loop_step_fn(gbatch)(tr.to_loop(state), gbatch)
  new = jax.device_get(tr.from_loop(new))
  update = jax.tree.map(lambda a, b: a - b, new.params, before)
  return update, new.batch_stats, jax.device_get(metrics)


def _rel(a, b):
  """Relative error of whole trees: ||a - b|| / ||b|| over all leaves.

  Per leaf it would be meaningless: several gradients are mathematically
  zero (a conv bias followed by a train-mode BN) and only carry rounding
  noise. A per-device instead of global-batch BN moves the statistics by
  O(1), far above the 1e-4 bound.
  """
  x = np.concatenate([np.ravel(v) for v in jax.tree.leaves(a)])
  y = np.concatenate([np.ravel(v) for v in jax.tree.leaves(b)])
  return float(np.linalg.norm(x - y) / np.linalg.norm(y))


@pytest.fixture(scope='module', params=['cpu', 'xla'])
def backend(request):
  """Each equivalence on both backends: the CPU package's forms and the
  plain ones ('xla', what TPUs and GPUs run)."""
  with ops.use_backend(request.param):
    yield request.param


@pytest.fixture(scope='module')
def single(backend, tmp_path_factory):
  del backend  # the single-device step on the same backend
  return _one_step(
    tiny_config(), jax.devices()[:1], tmp_path_factory.mktemp('one')
  )


@pytest.mark.parametrize('mesh', [(8, 1), (4, 2)], ids=['data8', 'data4x2'])
@pytest.mark.slow
def test_sharded_step_equals_single_device(
  mesh, backend, single, tmp_path, request
):
  if backend == 'xla' and mesh == (4, 2):
    # Found by this test: on XLA:CPU's SPMD partitioner the plain grouped
    # convolution's kernel gradient is wrong where a shard holds fewer rows
    # than the kernel's halo (64 px: P5 is 2 rows, 1 per device, under a
    # 5x5 depthwise kernel; blocks_14's kernel update is off by its own
    # size). The cpu backend's shifted-tap form is right there.
    request.applymarker(
      pytest.mark.xfail(
        strict=True, reason='XLA SPMD: depthwise kernel grad, tiny shards'
      )
    )
  assert jax.device_count() == 8, 'tests/conftest.py sets 8 CPU devices'
  config = tiny_config()
  config.mesh.data, config.mesh.spatial = mesh
  sharded = _one_step(config, jax.devices(), tmp_path / 'many')
  assert sharded[2]['loss'] == pytest.approx(single[2]['loss'], rel=1e-5)
  assert _rel(sharded[0], single[0]) <= 1e-4  # the update
  assert _rel(sharded[1], single[1]) <= 1e-4  # new BN statistics


def d7x_shaped_config():
  """D7x's structure (P3-P8, `sum` fusion) at toy size: the tiny B0
  backbone (every block form, ten blocks), two 16-filter BiFPN cells,
  256 px (P8 is 1x1; the smallest input). No remat: it recomputes the
  same function and would double the compile time of this test."""
  config = tiny_config(image=256)
  config.model = api.model_config(
    'efficientdet-d7x',
    backbone_name='efficientnet-b0-tiny',
    image_size=(256, 256),
    num_classes=3,
    fpn_num_filters=16,
    fpn_cell_repeats=2,
    box_class_repeats=1,
  )
  return config


@pytest.mark.slow
def test_d7x_shaped_spatial_step_equals_data_parallel(tmp_path):
  """(data=4, spatial=2): images split along H; equal to (data=8). On the
  cpu backend (its jnp forms on a mesh)."""
  with ops.use_backend('cpu'):
    _check_d7x_shaped(tmp_path)


def _check_d7x_shaped(tmp_path):
  config = d7x_shaped_config()
  assert config.model.max_level == 8
  assert config.model.fpn_weight_method == 'sum'
  runs = {}
  for mesh in ((8, 1), (4, 2)):
    config.mesh.data, config.mesh.spatial = mesh
    runs[mesh] = _one_step(config, jax.devices(), tmp_path / str(mesh))
  ref, spatial = runs[(8, 1)], runs[(4, 2)]
  assert spatial[2]['loss'] == pytest.approx(ref[2]['loss'], rel=1e-5)
  assert _rel(spatial[0], ref[0]) <= 1e-4  # the update
  assert _rel(spatial[1], ref[1]) <= 1e-4  # new BN statistics
