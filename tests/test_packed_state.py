"""The training loop's packed state (`effdet_jax/train/packed.py`): a host
round trip that changes no bit, and a step equal to the TrainState step
(`train/update.py: apply_update`) to float32 rounding, with frozen leaves
(unchanged, bit for bit) and a skipped non-finite step."""

import jax
import numpy as np
import pytest
from train_utils import fixed_batch, tiny_config

from effdet_jax.train import freeze, packed
from effdet_jax.train.trainer import Trainer


def _trainer(tmp_path, **train):
  config = tiny_config(batch_size=2, **train)
  config.mesh.data = 1
  return Trainer(config, str(tmp_path), jax.devices()[:1])


def _assert_equal_trees(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_pack_then_unpack_is_the_same_state(tmp_path):
  tr = _trainer(tmp_path)
  state = tr.fresh_state()
  # Distinct values in every leaf: a misplaced slice cannot go unseen.
  rng = np.random.default_rng(0)
  state = jax.tree.map(
    lambda x: (
      rng.normal(size=np.shape(x)).astype(x.dtype)
      if np.issubdtype(x.dtype, np.floating)
      else x
    ),
    jax.device_get(state),
  )
  loop = tr.to_loop(state)
  lay = tr.layout
  n = lay.params_size
  assert loop.params.shape == loop.trace.shape == loop.ema_params.shape == (n,)
  assert loop.ema_batch_stats.shape == (lay.stats_size,)
  sizes = [x.size for x in jax.tree.leaves(state.params)]
  # Every leaf starts on a block; the padding is zero and below a block
  # per leaf.
  assert [lo % lay.block for lo, _ in lay.param_slices] == [0] * len(sizes)
  assert sum(sizes) <= n < sum(sizes) + lay.block * len(sizes)
  inside = np.zeros((n,), bool)
  for lo, hi in lay.param_slices:
    inside[lo:hi] = True
  for v in (loop.params, loop.trace, loop.ema_params):
    assert not np.asarray(v)[~inside].any()
  assert len(lay.block_leaf) * lay.block == n
  _assert_equal_trees(jax.device_get(tr.from_loop(loop)), state)
  # The step's view of the vector is the same tree.
  _assert_equal_trees(
    jax.device_get(jax.jit(lay.params_tree)(loop.params)), state.params
  )


def test_layout_refuses_what_it_cannot_pack(tmp_path):
  tr = _trainer(tmp_path)
  abstract = tr.abstract_state.replace(
    ema_params=jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, np.float16),
      tr.abstract_state.ema_params,
    )
  )
  with pytest.raises(ValueError, match='float32'):
    packed.Layout(abstract)


def _run(tr, step, state, batches):
  metrics = []
  for b in batches:
    state, m = step(state, b)
    metrics.append(jax.device_get(m))
  return state, metrics


@pytest.mark.slow
@pytest.mark.parametrize('freeze_expr', ['', 'efficientnet'])
def test_packed_step_equals_the_trainstate_step(tmp_path, freeze_expr):
  tr = _trainer(tmp_path, freeze=freeze_expr, clip_gradients_norm=1.0)
  host = [fixed_batch(tr.config, seed=i) for i in range(3)]
  # The second batch overflows: the step is skipped, state unchanged.
  host[1]['image'] = host[1]['image'] * np.float32(np.inf)
  batches = []
  for i, h in enumerate(host):
    sh = tr.batch_sharding(h)
    b = {k: jax.device_put(v, sh[k]) for k, v in h.items()}
    b['learning_rate'] = tr.learning_rate(i + 2)
    batches.append(b)
  ref, ref_metrics = _run(tr, tr.step_fn(batches[0]), tr.fresh_state(), batches)
  loop, loop_metrics = _run(
    tr, tr.loop_step_fn(batches[0]), tr.to_loop(tr.fresh_state()), batches
  )
  assert [int(m['nonfinite']) for m in loop_metrics] == [0, 1, 0]
  for m, n in zip(ref_metrics, loop_metrics, strict=True):
    assert set(m) == set(n)
    for k in m:
      # The sums of squares add in another order (blocks): the gradient
      # norm and the clip factors agree to float32 rounding.
      np.testing.assert_allclose(m[k], n[k], rtol=2e-6, err_msg=k)
  got = jax.device_get(tr.from_loop(loop))
  ref = jax.device_get(ref)
  la, ta = jax.tree.flatten(got)
  lb, tb = jax.tree.flatten(ref)
  assert ta == tb
  # Float32 rounding of the clip factors, carried through two applied
  # steps (BN over a batch of 2 amplifies it): a misplaced slice, a wrong
  # momentum or decay moves values by the size of an update (1e-3..1e-2).
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6)
  assert int(got.num_skipped) == 1 and int(got.last_skipped_step) == 1
  if freeze_expr:
    # Frozen leaves: bit for bit the initial values, no momentum.
    init = jax.device_get(tr.fresh_state())
    mask, _ = freeze.masks(
      {'params': init.params, 'batch_stats': init.batch_stats},
      freeze_expr,
      tr.config.model.backbone_name,
    )
    frozen = [m for m in jax.tree.leaves(mask)]
    assert 0 < sum(frozen) < len(frozen)
    for f, x, y in zip(
      frozen,
      jax.tree.leaves(got.params),
      jax.tree.leaves(init.params),
      strict=True,
    ):
      if f:
        np.testing.assert_array_equal(x, y)
    assert len(jax.tree.leaves(got.opt_state)) == len(frozen) - sum(frozen)
