"""Optimiser, schedule, weight decay, clipping, EMA and freezing on toy trees,
against hand computations of the official TF1 semantics
(`efficientdet/det_model_fn.py: _model_fn`, `reg_l2_loss`,
`learning_rate_schedule`; `efficientdet/efficientdet_arch.py: freeze_vars`).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from effdet_jax.train import optimizer, schedule


def _train_cfg(**kw):
  base = dict(
    batch_size=128,
    num_steps=0,
    num_epochs=300.0,
    num_examples_per_epoch=120000,
    learning_rate=0.08,
    lr_warmup_init=0.008,
    lr_warmup_epoch=1.0,
    lr_warmup_steps=-1,
    lr_decay_method='cosine',
    first_lr_drop_epoch=200.0,
    second_lr_drop_epoch=250.0,
    poly_lr_power=0.9,
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_cosine_schedule_tf1():
  cfg = _train_cfg()
  steps = schedule.steps_from_config(cfg)
  # 120000 / 128 = 937.5 steps per epoch (TF1 float division).
  assert steps.warmup == 937 and steps.total == 281250
  lr = schedule.learning_rate_fn(cfg, steps)
  adjusted, warm = 0.08 * 2, 0.008 * 2  # TF1 scales both by batch / 64
  assert float(lr(0)) == pytest.approx(warm)
  assert float(lr(468)) == pytest.approx(warm + 468 / 937 * (adjusted - warm))
  # Cosine on the raw step with denominator total - warmup.
  denom = 281250 - 937
  for step in (937, 140000, 281250 - 937, 281249):
    want = 0.5 * adjusted * (1 + math.cos(math.pi * step / denom))
    assert float(lr(step)) == pytest.approx(want, rel=1e-5, abs=1e-9)


def test_stepwise_polynomial_constant():
  cfg = _train_cfg(lr_decay_method='stepwise', batch_size=64)
  steps = schedule.steps_from_config(cfg)
  lr = schedule.learning_rate_fn(cfg, steps)
  assert float(lr(steps.first_drop - 1)) == pytest.approx(0.08)
  assert float(lr(steps.first_drop)) == pytest.approx(0.008)
  assert float(lr(steps.second_drop)) == pytest.approx(0.0008)
  cfg = _train_cfg(
    lr_decay_method='polynomial',
    batch_size=64,
    num_steps=1000,
    lr_warmup_steps=0,
  )
  lr = schedule.learning_rate_fn(cfg, schedule.steps_from_config(cfg))
  assert float(lr(500)) == pytest.approx(0.08 * 0.5**0.9, rel=1e-6)
  with pytest.raises(ValueError, match='lr_decay_method'):
    schedule.learning_rate_fn(_train_cfg(lr_decay_method='linear'), steps)


def _toy():
  return {
    'conv': {'kernel': jnp.array([[3.0, 4.0]]), 'bias': jnp.array([1.0, 1.0])},
    'bn': {'scale': jnp.array([2.0]), 'bias': jnp.array([5.0])},
    'sep': {
      'depthwise_kernel': jnp.array([1.0, 2.0]),
      'pointwise_kernel': jnp.array([2.0]),
    },
    'fnode0': {'WSM': jnp.array(7.0)},
  }


def test_weight_decay_kernels_only():
  params = _toy()
  mask = optimizer.decay_mask(params)
  assert mask['conv']['kernel'] and mask['sep']['depthwise_kernel']
  assert not mask['conv']['bias'] and not mask['bn']['scale']
  assert not mask['fnode0']['WSM']
  wd = optimizer.weight_decay_loss(params, mask, 4e-5)
  assert float(wd) == pytest.approx(4e-5 * 0.5 * (9 + 16 + 1 + 4 + 4))


def test_clipping_per_tensor_then_global():
  grads = {'a': jnp.array([30.0, 40.0]), 'b': jnp.array([6.0, 8.0])}
  clip = optimizer.clip_per_tensor_then_global(10.0)
  out, _ = clip.update(grads, clip.init(grads))
  # a: norm 50 -> 10 ([6, 8]); b: norm 10 stays; global norm sqrt(200).
  scale = 10.0 / math.sqrt(200.0)
  np.testing.assert_allclose(out['a'], np.array([6.0, 8.0]) * scale, rtol=1e-6)
  np.testing.assert_allclose(out['b'], np.array([6.0, 8.0]) * scale, rtol=1e-6)


def test_momentum_matches_tf1_and_freeze():
  params = {'w': jnp.array([1.0, -2.0]), 'frozen': jnp.array([5.0])}
  frozen = {'w': False, 'frozen': True}
  tx = optimizer.make_optimizer(0.9, 0.0, frozen)
  state = tx.init(params)
  accum_ref = np.zeros(2)
  w_ref = np.array([1.0, -2.0])
  for step, (g, lr) in enumerate([([0.5, 1.0], 0.1), ([-1.0, 2.0], 0.05)]):
    grads = {'w': jnp.array(g), 'frozen': jnp.array([3.0])}
    accum, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda w, a, lr=lr: w - lr * a, params, accum)
    accum_ref = 0.9 * accum_ref + np.array(g)  # a = m*a + g; w -= lr*a
    w_ref = w_ref - lr * accum_ref
    np.testing.assert_allclose(params['w'], w_ref, rtol=1e-6, err_msg=str(step))
  assert float(params['frozen'][0]) == 5.0
  mask = optimizer.mask_by_regex(
    {'backbone': {'k': 1}, 'fpn_cells': {'k': 1}, 'class_net': {'k': 1}},
    '^(backbone|fpn)',
  )
  assert mask == {
    'backbone': {'k': True},
    'fpn_cells': {'k': True},
    'class_net': {'k': False},
  }


def test_ema_warmup_and_update():
  # tf.train.ExponentialMovingAverage(0.9998, num_updates=n).
  assert float(optimizer.ema_decay(1, 0.9998)) == pytest.approx(2 / 11)
  assert float(optimizer.ema_decay(100, 0.9998)) == pytest.approx(101 / 110)
  assert float(optimizer.ema_decay(10**7, 0.9998)) == pytest.approx(0.9998)
  ema = optimizer.ema_update({'a': jnp.array(1.0)}, {'a': jnp.array(3.0)}, 0.25)
  assert float(ema['a']) == pytest.approx(0.25 * 1 + 0.75 * 3)


def test_host_schedule_equals_the_compiled_one():
  """The trainer feeds the step the NumPy form's learning rate."""
  steps_at = np.array([0, 1, 468, 936, 937, 5000, 140000, 281249])
  for method in schedule.DECAY_METHODS:
    cfg = _train_cfg(lr_decay_method=method)
    steps = schedule.steps_from_config(cfg)
    host = schedule.learning_rate_fn(cfg, steps, xp=np)
    jitted = jax.jit(schedule.learning_rate_fn(cfg, steps))
    for step in steps_at:
      got = host(int(step))
      assert got.dtype == np.float32
      # f32 either way; near the cosine's end 1 + cos(x) cancels, so the
      # tolerance is relative to the peak rate (0.16).
      assert got == pytest.approx(float(jitted(step)), rel=1e-6, abs=2e-7)


def _toy_state(tx, params, stats):
  from effdet_jax.train.state import TrainState

  return TrainState(
    step=jnp.asarray(3, jnp.int32),
    params=params,
    batch_stats=stats,
    opt_state=tx.init(params),
    ema_params=jax.tree.map(lambda x: x * 0.5, params),
    ema_batch_stats=jax.tree.map(lambda x: x + 1.0, stats),
    rng=jax.random.PRNGKey(0),
    num_skipped=jnp.asarray(0, jnp.int32),
    last_skipped_step=jnp.asarray(-1, jnp.int32),
  )


@pytest.mark.parametrize('clip', [10.0, 0.0])
@pytest.mark.parametrize('freeze', [False, True])
def test_step_update_equals_the_optax_chain(clip, freeze):
  """`train/update.py` (one sum of squares per leaf, `lax.cond`) computes
  what `make_optimizer`'s optax chain + `w -= lr * a` + EMA compute, and
  leaves the optimizer state's structure as `tx.init` made it."""
  from effdet_jax.train import update

  rng = np.random.default_rng(0)
  params = {
    'a': {'kernel': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
    'b': jnp.asarray(rng.normal(size=(5,)), jnp.float32),
    'c': jnp.asarray(rng.normal(size=()), jnp.float32),
  }
  stats = {'mean': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  frozen = {'a': {'kernel': False}, 'b': True, 'c': False} if freeze else None
  tx = optimizer.make_optimizer(0.9, clip, frozen)
  state = _toy_state(tx, params, stats)
  lr, decay = jnp.float32(0.1), 0.99
  for i in range(3):
    grads = jax.tree.map(
      lambda x, i=i: jnp.asarray(rng.normal(size=x.shape) * 20, x.dtype),
      params,
    )
    if freeze:
      grads['b'] = jnp.zeros_like(grads['b'])  # stop_gradient in the step
    new_stats = jax.tree.map(lambda x: x * 0.9 + 0.1, state.batch_stats)
    accum, opt_ref = tx.update(grads, state.opt_state, state.params)
    w_ref = jax.tree.map(lambda w, a: w - lr * a, state.params, accum)
    d = optimizer.ema_decay(state.step + 1, decay)
    ema_ref = optimizer.ema_update(state.ema_params, w_ref, d)
    bs_ema_ref = optimizer.ema_update(state.ema_batch_stats, new_stats, d)
    norm_ref = optax.global_norm(grads)
    state, norm, ok = jax.jit(
      lambda s, g, b: update.apply_update(
        s,
        g,
        b,
        jnp.float32(1.0),
        lr,
        momentum=0.9,
        clip_norm=clip,
        ema_decay=decay,
        frozen=frozen,
      )
    )(state, grads, new_stats)
    assert bool(ok), i
    assert float(norm) == pytest.approx(float(norm_ref), rel=1e-6)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(opt_ref)
    for got, want in [
      (state.params, w_ref),
      (state.opt_state, opt_ref),
      (state.ema_params, ema_ref),
      (state.ema_batch_stats, bs_ema_ref),
      (state.batch_stats, new_stats),
    ]:
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-7, err_msg=str(i))
  if freeze:
    np.testing.assert_array_equal(state.params['b'], params['b'])
  assert int(state.step) == 6 and int(state.num_skipped) == 0


@pytest.mark.parametrize('bad', ['loss', 'grad', 'stats'])
def test_step_update_skips_a_nonfinite_step(bad):
  from effdet_jax.train import update

  params = {'w': jnp.arange(4.0), 'v': jnp.ones((2, 2))}
  stats = {'var': jnp.ones((3,))}
  tx = optimizer.make_optimizer(0.9, 10.0)
  state = _toy_state(tx, params, stats)
  grads = jax.tree.map(jnp.ones_like, params)
  new_stats = {'var': jnp.full((3,), 2.0)}
  loss = jnp.float32(1.0)
  if bad == 'loss':
    loss = jnp.float32(np.nan)
  elif bad == 'grad':
    grads['v'] = grads['v'].at[1, 0].set(np.inf)
  else:  # an overflowing batch variance, with a finite loss
    new_stats = {'var': jnp.array([1.0, np.inf, 1.0])}
  out, _, ok = update.apply_update(
    state,
    grads,
    new_stats,
    loss,
    jnp.float32(0.1),
    momentum=0.9,
    clip_norm=10.0,
    ema_decay=0.99,
  )
  assert not bool(ok)
  assert int(out.step) == 4 and int(out.num_skipped) == 1
  assert int(out.last_skipped_step) == 3
  for a, b in zip(
    jax.tree.leaves(
      (
        state.params,
        state.opt_state,
        state.ema_params,
        state.batch_stats,
        state.ema_batch_stats,
      )
    ),
    jax.tree.leaves(
      (
        out.params,
        out.opt_state,
        out.ema_params,
        out.batch_stats,
        out.ema_batch_stats,
      )
    ),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
  'clip, freeze', [(10.0, False), (0.0, False), (10.0, True)]
)
def test_host_initial_state_is_the_chains_init(clip, freeze):
  """The trainer draws the optimizer state on the host as zeros from its
  abstract form; for every chain `make_optimizer` builds, that is
  `tx.init` exactly (structure, dtypes, values)."""
  params = {
    'conv': {'kernel': jnp.ones((3, 3, 4, 8)), 'bias': jnp.full((8,), 2.0)},
    'bn': {'scale': jnp.ones((8,))},
  }
  frozen = None
  if freeze:
    frozen = {
      'conv': {'kernel': True, 'bias': False},
      'bn': {'scale': False},
    }
  tx = optimizer.make_optimizer(0.9, clip, frozen)
  want = tx.init(params)
  got = optimizer.host_initial_state(jax.eval_shape(tx.init, params))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert isinstance(g, np.ndarray) and g.dtype == w.dtype
    np.testing.assert_array_equal(g, w)
