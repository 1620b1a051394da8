"""Checkpoints across meshes, and the non-finite guards."""

import jax
import numpy as np
import pytest
from train_utils import fixed_batch, tiny_config

from effdet_jax.runtime import checkpoint
from effdet_jax.train.trainer import Trainer, train_and_evaluate


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path):
  config = tiny_config()
  config.mesh.data = 8
  many = Trainer(config, str(tmp_path), devices=jax.devices())
  state = many.fresh_state()
  ckpt = checkpoint.Checkpointer(str(tmp_path), 1, 2)
  ckpt.save(5, state, force=True)
  ckpt.close()
  config.mesh.data = 1
  one = Trainer(config, str(tmp_path), devices=jax.devices()[:1])
  ckpt = checkpoint.Checkpointer(str(tmp_path), 1, 2)
  restored = ckpt.restore(one.abstract_with_shardings())
  ckpt.close()
  leaf = jax.tree.leaves(restored.params)[0]
  assert leaf.sharding.device_set == {jax.devices()[0]}
  for a, b in zip(
    jax.tree.leaves(state), jax.tree.leaves(restored), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_nonfinite_step_is_skipped_or_stops_the_run(tmp_path):
  config = tiny_config(num_steps=4, skip_nonfinite=False)
  config.mesh.data = 1
  config.checkpoint.every_steps = 1
  good = fixed_batch(config)
  bad = dict(good, image=np.full_like(good['image'], np.nan))

  def batches(start):
    for step in range(start, 100):
      yield bad if step == 2 else good

  with pytest.raises(FloatingPointError, match='at step 3'):
    train_and_evaluate(config, str(tmp_path / 'stop'), batches=batches)
  # What was checkpointed before the error is finite and at most step 2.
  tr = Trainer(config, str(tmp_path / 'stop'), devices=jax.devices()[:1])
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'stop'), 1, 3)
  saved = ckpt.restore(tr.abstract_with_shardings())
  ckpt.close()
  assert int(saved.step) <= 2
  assert all(
    np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(saved.params)
  )
  # With skip_nonfinite the update is not applied and is counted.
  state = tr.fresh_state()
  before = jax.device_get(state.params)
  # The step the trainer runs (packed state).
  state, metrics = tr.loop_step_fn(bad)(tr.to_loop(state), bad)
  state = tr.from_loop(state)
  assert int(metrics['nonfinite']) == 1 and int(state.num_skipped) == 1
  assert int(state.step) == 1 and int(state.last_skipped_step) == 0
  for a, b in zip(
    jax.tree.leaves(before), jax.tree.leaves(state.params), strict=True
  ):
    np.testing.assert_array_equal(a, np.asarray(b))
