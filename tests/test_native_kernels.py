"""The compiled XLA:CPU kernels compute what the jnp forms compute.

`effdet_jax/kernels/*.cc` are built with the system C++ compiler on first
use. The facts relied on: depthwise conv with TF SAME padding (pad before
= total // 2), and Keras BN in training mode (batch statistics with the
fast variance E[x^2] - E[x]^2, then the activation), with their gradients;
the summed sigmoid focal loss of one level (official `efficientdet/
det_model_fn.py: focal_loss`) and its gradient.

Cost: nearly all of this file's time is XLA compiles (tens of ms for
the smallest program, ~0.5 s for one `jax.random` draw). So the inputs
are drawn with numpy (from jax.random, in one program, only where a bound
was set with those draws), and a case runs its kernel form (forward and
gradients) as one jitted program traced under `cpu_library.forced(True)`
and its reference as another traced outside it: no eager ops, each
primitive and shape of which compiles a program of its own (and `forced`
clears JAX's caches on entry and exit).
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from effdet_jax import ops
from effdet_jax.cpu import batch_norm as bn_lib
from effdet_jax.cpu import (
  focal,
  layers,
  native_batch_norm,
  native_focal,
  native_fusion,
  native_pointwise,
  native_weight_grad,
)
from effdet_jax.cpu import library as cpu_library
from effdet_jax.models import layers as plain_layers

pytestmark = pytest.mark.skipif(
  not cpu_library.load(), reason='no C++ compiler: the jnp forms run instead'
)


def _rel(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _normal(rng, shape, scale=1.0, loc=0.0):
  """float32 draws from N(loc, scale^2) (numpy: no compile)."""
  return (rng.standard_normal(shape, np.float32) * scale + loc).astype(
    np.float32
  )


def _uniform(rng, shape, low=0.0, high=1.0):
  return rng.uniform(low, high, shape).astype(np.float32)


def _jax_normal(*draws):
  """`jax.random.normal(jax.random.key(seed), shape)` for each `(seed,
  shape)`, in numpy: one compiled program (threefry compiles slowly, ~0.5
  s). For the cases whose bounds sit close to their error with these
  draws, which other draws exceed."""
  return jax.device_get(
    jax.jit(
      lambda: [
        jax.random.normal(jax.random.key(s), shape) for s, shape in draws
      ]
    )()
  )


def _run(fn, *args, text=None):
  """`jax.jit(fn)(*args)` traced and compiled once, the results in numpy;
  with `text='lowered'` or `'compiled'` also that program's text."""
  lowered = jax.jit(fn).lower(*args)
  compiled = lowered.compile()
  out = jax.device_get(compiled(*args))
  if text is None:
    return out
  return out, (lowered if text == 'lowered' else compiled).as_text()


def _with_grads(fn, argnums, pick=lambda y: y):
  """`(args, cot) -> (fn(*args), grads)`: the gradients of
  `sum(pick(fn(*args)) * cot)` with respect to `args[argnums]`."""

  def run(args, cot):
    grads = jax.grad(lambda *a: jnp.sum(pick(fn(*a)) * cot), argnums=argnums)(
      *args
    )
    return fn(*args), grads

  return run


@pytest.mark.parametrize(
  'k,stride,shape',
  [
    (3, 1, (2, 9, 7, 16)),
    (3, 2, (2, 10, 13, 24)),  # 24 channels: a 16-block and an 8-block
    (5, 1, (1, 12, 11, 19)),  # 19: the scalar tail too
    (5, 2, (3, 9, 8, 40)),
    (3, 2, (1, 1, 1, 16)),  # one pixel: every tap but the centre pads
  ],
)
def test_depthwise_matches_lax_and_shift(k, stride, shape):
  rng = np.random.default_rng(0)
  x = _normal(rng, shape)
  kernel = _normal(rng, (k, k, shape[-1], 1))
  impls = ('native', 'shift', 'lax')
  lax_form = functools.partial(layers.depthwise_conv, stride=stride, impl='lax')
  y = jax.eval_shape(lax_form, x, kernel)
  cot = _normal(rng, y.shape)

  def run(x, kernel, cot):
    out, grads = {}, {}
    for impl in impls:
      f = functools.partial(layers.depthwise_conv, stride=stride, impl=impl)
      out[impl], grads[impl] = _with_grads(f, (0, 1))((x, kernel), cot)
    return out, grads

  out, grads = _run(run, x, kernel, cot)
  assert out['native'].shape == out['lax'].shape
  assert _rel(out['native'], out['lax']) < 1e-5
  assert _rel(out['native'], out['shift']) < 1e-5
  for a, b in zip(grads['native'], grads['lax'], strict=True):
    assert _rel(a, b) < 1e-5


def test_depthwise_kernel_gradient_is_deterministic():
  rng = np.random.default_rng(0)
  x = _normal(rng, (4, 32, 32, 48))
  w = _normal(rng, (3, 3, 48, 1))
  grad = jax.jit(
    jax.grad(
      lambda w, x: jnp.sum(layers.depthwise_conv(x, w, 1, 'native') ** 2)
    )
  )
  first = np.asarray(grad(w, x))
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(grad(w, x)), first)


def test_auto_picks_native_for_f32_on_one_device_only():
  with cpu_library.forced(True):
    assert layers._default_depthwise_impl(jnp.float32, 3, 1) == 'native'
    assert layers._default_depthwise_impl(jnp.bfloat16, 3, 1) == 'shift'
  with cpu_library.forced(False):
    assert layers._default_depthwise_impl(jnp.float32, 3, 1) == 'shift'
  # The test process emulates 8 devices: a mesh run keeps the jnp form.
  assert jax.device_count() > 1
  assert layers._default_depthwise_impl(jnp.float32, 3, 1) == 'shift'


@pytest.mark.parametrize(
  'act',
  [None, plain_layers.swish, jax.nn.relu, plain_layers.relu6, jax.nn.silu],
)
@pytest.mark.parametrize('shape', [(2, 6, 5, 40), (3, 4, 4, 19)])
def test_batch_norm_act_matches_jnp(act, shape):
  # Wide inputs so the activation sees large |z| (the exp clamp) too.
  rng = np.random.default_rng(0)
  x = _normal(rng, shape, 3.0, 1.0)
  scale = _normal(rng, shape[-1:], 10.0)
  bias = _normal(rng, shape[-1:])
  cot = _normal(rng, shape)

  def loss(x, scale, bias, cot):
    y, mean, var = bn_lib.normalize_act_train(x, scale, bias, 1e-3, act)
    return jnp.sum(y * cot), (y, mean, var)

  # A new jit per setting: the kernels are chosen as it is traced.
  run = lambda: jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)  # noqa: E731
  with cpu_library.forced(True):
    assert native_batch_norm.supports(x.dtype, act)
    native = _run(run(), x, scale, bias, cot)
  with cpu_library.forced(False):
    ref = _run(run(), x, scale, bias, cot)
  for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(ref), strict=True):
    assert np.isfinite(np.asarray(a)).all()
    assert _rel(a, b) < 2e-5


@pytest.mark.parametrize('act', [None, plain_layers.swish, jax.nn.relu])
@pytest.mark.parametrize(
  'shape',
  [
    (2, 6, 5, 40),  # a 16-block, an 8-block and a tail of channels
    (3, 4, 4, 19),
    (8, 64, 64, 24),  # 4096 pixels per image: several chunks each
  ],
)
def test_batch_norm_pooled_matches_jnp(act, shape):
  """BN + act with squeeze-excitation's squeeze (the output's mean per
  image) summed in the kernel, and its gradient added to dy inside the
  backward, against BN then `jnp.mean`: values, statistics, the pooled
  mean, and the gradients through both outputs."""
  rng = np.random.default_rng(0)
  x = _normal(rng, shape, 2.0, 0.5)
  c = shape[-1]
  scale = _normal(rng, (c,))
  bias = _normal(rng, (c,))
  cot = _normal(rng, shape)
  cot_pool = _normal(rng, (shape[0], c), 50.0)

  def unfused(x, scale, bias):
    y, mean, var = bn_lib.normalize_act_train(x, scale, bias, 1e-3, act)
    return y, mean, var, bn_lib._pool(y)

  def fused(x, scale, bias):
    return bn_lib.normalize_act_train_pooled(x, scale, bias, 1e-3, act)

  def run(fn):
    def loss(x, scale, bias, cot, cot_pool):
      y, _, _, pool = fn(x, scale, bias)
      return jnp.sum(y * cot) + jnp.sum(pool * cot_pool), fn(x, scale, bias)

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

  args = (x, scale, bias, cot, cot_pool)
  with cpu_library.forced(True):
    got, text = _run(run(fused), *args, text='lowered')
    assert 'EffdetBatchNormForwardPooled' in text
  with cpu_library.forced(False):
    want = _run(run(unfused), *args)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert _rel(a, b) < 2e-5


def test_batch_norm_statistics_keep_precision_with_a_large_mean():
  # E[x^2] - E[x]^2 in f32 over many pixels loses the variance when the
  # mean is large; the kernel sums in double.
  x = _normal(np.random.default_rng(0), (8, 64, 64, 16), loc=100.0)
  ones, zeros = np.ones(16, np.float32), np.zeros(16, np.float32)
  with cpu_library.forced(True):
    _, mean, var = jax.jit(
      lambda x: bn_lib.normalize_act_train(x, ones, zeros, 1e-3, None)
    )(x)
  xd = np.asarray(x, np.float64).reshape(-1, 16)
  np.testing.assert_allclose(mean, xd.mean(0), rtol=1e-6)
  np.testing.assert_allclose(var, xd.var(0), rtol=1e-3)


def test_batch_norm_propagates_nan():
  # The trainer's NaN guard must still see a NaN loss.
  x = np.ones((2, 3, 3, 16), np.float32)
  x[0, 1, 1, 3] = np.nan
  with cpu_library.forced(True):
    y, mean, _ = jax.jit(
      lambda x: bn_lib.normalize_act_train(
        x, jnp.ones(16), jnp.zeros(16), 1e-3, jax.nn.relu
      )
    )(x)
  assert np.isnan(np.asarray(y)[..., 3]).all()
  assert np.isnan(np.asarray(mean)[3])
  assert np.isfinite(np.asarray(y)[..., 2]).all()


def test_unknown_activation_uses_jnp():
  assert native_batch_norm.act_code(jnp.tanh) is None
  with cpu_library.forced(True):
    assert not native_batch_norm.supports(jnp.float32, jnp.tanh)
    assert not native_batch_norm.supports(jnp.bfloat16, None)


@pytest.mark.parametrize(
  'num_classes,anchors', [(90, 9), (3, 2), (16, 1), (21, 3)]
)
@pytest.mark.parametrize('gamma', [1.5, 2.0, 0.5])  # 1.5, 2: s√s, s²; else exp
def test_focal_loss_matches_jnp(num_classes, anchors, gamma):
  """Loss and gradient, with class ids for background (-1), ignored (-2)
  and every class; 90 classes = five 16-blocks and a padded 8-block tail,
  3 a tail only. Logits from -90 to 90 reach both exp clamps."""
  rng = np.random.default_rng(0)
  shape = (2, 5, 4, anchors * num_classes)
  x = (rng.standard_normal(shape) * 6).astype(np.float32)
  x.reshape(-1)[:8] = [-90, -30, -1e-7, 0, 1e-7, 17, 40, 90]
  ids = rng.integers(-2, num_classes, (2, 5 * 4 * anchors)).astype(np.int32)
  cot = 0.37

  def run(*fns):
    # One program for the forms traced under the same setting.
    def f(x):
      return [
        jax.value_and_grad(
          lambda x, fn=fn: cot * fn(x, ids, num_classes, 0.25, gamma)
        )(x)
        for fn in fns
      ]

    return _run(f, x)

  native_fn = lambda x, i, c, a, g: native_focal.focal_loss_sum(
    x, i, 1.0, c, a, g
  )
  with cpu_library.forced(True):
    assert native_focal.supports(jnp.float32)
    native, dispatched = run(native_fn, focal.focal_loss_sum)
  (ref,) = run(focal.focal_loss_sum_jnp)
  for out in (native, dispatched):
    assert _rel(out[0], ref[0]) < 1e-5
    np.testing.assert_allclose(out[1], ref[1], rtol=2e-5, atol=1e-7)


def test_focal_loss_scale_is_applied_in_the_kernel():
  """`scale` (the loss normaliser's inverse) multiplies the sum and the
  gradient written by the kernel, its own gradient is the unscaled sum; and
  with the constant cotangent of a training loss the compiled gradient has
  no multiply over the logits (XLA folds the cotangent away)."""
  rng = np.random.default_rng(0)
  x = _normal(rng, (2, 4, 4, 9 * 90), 3.0)
  ids = rng.integers(-1, 90, (2, 4 * 4 * 9), np.int32)
  loss = lambda x, s, f: f(x, ids, 90, 0.25, 1.5, s)
  with cpu_library.forced(True):
    got = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)(
      x, 0.125, focal.focal_loss_sum
    )
    text = (
      jax.jit(jax.grad(lambda x: loss(x, 0.125, focal.focal_loss_sum)))
      .lower(x)
      .compile()
      .as_text()
    )
  jnp_form = lambda x, i, c, a, g, s: (
    s * focal.focal_loss_sum_jnp(x, i, c, a, g)
  )
  want = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)(
    x, 0.125, jnp_form
  )
  got, want = jax.device_get((got, want))
  assert _rel(got[0], want[0]) < 1e-5
  np.testing.assert_allclose(got[1][0], want[1][0], rtol=2e-5, atol=1e-8)
  assert _rel(got[1][1], want[1][1]) < 1e-5
  assert not any(
    ' multiply(' in line and '[2,4,4,810]' in line for line in text.splitlines()
  )


def test_focal_loss_flat_streaming_path_matches_jnp():
  """A level over 32 MiB (the kernel's non-temporal gradient stores) with
  anchors split across vectors and chunks: equal to the jnp form."""
  rng = np.random.default_rng(0)
  x = _normal(rng, (2, 24, 24, 9 * 1000), 4.0)
  ids = rng.integers(-2, 1000, (2, 24 * 24 * 9), np.int32)
  assert x.size * 4 >= 32 << 20
  loss = lambda x, fn: fn(x, ids, 1000, 0.25, 1.5)
  with cpu_library.forced(True):
    got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(
      x, focal.focal_loss_sum
    )
  want = jax.jit(jax.value_and_grad(loss), static_argnums=1)(
    x, focal.focal_loss_sum_jnp
  )
  assert _rel(got[0], want[0]) < 1e-5
  np.testing.assert_allclose(got[1], want[1], rtol=2e-5, atol=1e-7)


def test_kernel_swish_at_the_exp_clamps_and_nan():
  """The kernels' 16-lane exp clamps its argument to [-87, 88] (min/max)
  and scales by 2^n (vscalefps): swish through the inference 1x1 kernel
  (identity weights) equals jnp's from -1000 to 1000, across both clamps,
  in the 16-lane blocks and the 8-lane tail alike; a NaN stays NaN (x's
  row is NaN after the product, as in jnp's)."""
  z = np.concatenate(
    [np.linspace(-1000, 1000, 41), [-88.5, -87.5, -87, 87.5, 88, 88.5, 90]]
  ).astype(np.float32)
  x = np.resize(z, (len(z), 24))  # 16 + 8 lanes per row
  x[3, 5] = x[4, 20] = np.nan
  eye = np.eye(24, dtype=np.float32)
  ones, zeros = np.ones(24, np.float32), np.zeros(24, np.float32)
  with cpu_library.forced(True):
    got = np.asarray(
      jax.jit(native_pointwise.pointwise_affine_act, static_argnums=4)(
        x, eye, ones, zeros, jax.nn.silu
      )
    )
  want = np.asarray(jax.jit(lambda x, eye: jax.nn.silu(x @ eye))(x, eye))
  assert np.isnan(got[3]).all() and np.isnan(got[4]).all()
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  ok = ~np.isnan(want)
  np.testing.assert_allclose(got[ok], want[ok], rtol=2e-6, atol=1e-30)


def test_focal_loss_is_deterministic_and_propagates_nan():
  rng = np.random.default_rng(0)
  x = _normal(rng, (4, 8, 8, 9 * 90), 3.0)
  ids = rng.integers(-1, 90, (4, 8 * 8 * 9), np.int32)
  f = jax.jit(lambda x: native_focal.focal_loss_sum(x, ids, 1.0, 90, 0.25, 1.5))
  assert np.asarray(f(x)).tobytes() == np.asarray(f(x)).tobytes()
  x_nan = x.copy()
  x_nan[1, 2, 3, 4] = np.nan
  assert np.isnan(float(f(x_nan)))


@pytest.mark.parametrize('k,stride', [(3, 1), (5, 2)])
@pytest.mark.parametrize(
  'act', [None, plain_layers.swish, jax.nn.relu, plain_layers.relu6]
)
@pytest.mark.slow
def test_depthwise_affine_act_epilogue_matches_unfused(k, stride, act):
  """The inference BN + activation applied as the depthwise kernel stores
  its outputs; 19 channels: a 16-block and the scalar tail. The gradient
  (through the unfused form) too."""
  shape = (2, 9, 8, 19)
  rng = np.random.default_rng(0)
  x = _normal(rng, shape, 2.0)
  kernel = _normal(rng, (k, k, 19, 1))
  scale = _normal(rng, (19,), 3.0)
  shift = _normal(rng, (19,))

  def unfused(x, kernel, scale, shift):
    z = layers.depthwise_conv(x, kernel, stride, 'lax') * scale + shift
    return z if act is None else act(z)

  def fused(x, kernel, scale, shift):
    return layers.depthwise_conv_affine_act(
      x, kernel, stride, scale, shift, act, impl='native'
    )

  args = (x, kernel, scale, shift)
  cot = _normal(rng, jax.eval_shape(unfused, *args).shape)
  with cpu_library.forced(True):
    got, g = _run(_with_grads(fused, (0, 1, 2, 3)), args, cot)
  want, g_want = _run(_with_grads(unfused, (0, 1, 2, 3)), args, cot)
  assert _rel(got, want) < 1e-5
  for a, b in zip(g, g_want, strict=True):
    assert _rel(a, b) < 1e-4


@pytest.mark.parametrize('k,stride', [(3, 1), (3, 2), (5, 2)])
def test_depthwise_affine_act_pooled_matches_unfused(k, stride):
  """The inference epilogue with SE's squeeze summed per output row as the
  kernel writes it: output and per-image channel means equal the unfused
  form's; the means' gradient too; and an inference model's SE blocks use
  it (no separate reduction over the depthwise output)."""
  rng = np.random.default_rng(0)
  x = _normal(rng, (3, 11, 9, 21), 2.0)
  kernel = _normal(rng, (k, k, 21, 1))
  scale = _normal(rng, (21,), 3.0)
  shift = _normal(rng, (21,))

  def run(x, impl):
    return layers.depthwise_conv_affine_act(
      x,
      kernel,
      stride,
      scale,
      shift,
      plain_layers.swish,
      impl=impl,
      pooled=True,
    )

  def with_mean_grad(impl):
    def f(x):
      return run(x, impl), jax.grad(lambda x: jnp.sum(run(x, impl)[1]))(x)

    return _run(f, x)

  with cpu_library.forced(True):
    got, g = with_mean_grad('native')
  want, g_want = with_mean_grad('lax')
  assert _rel(got[0], want[0]) < 1e-5
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
  assert got[1].shape == (3, 21)
  assert _rel(g, g_want) < 1e-5


@pytest.mark.parametrize(
  'shape,width,k,stride,pooled',
  [
    ((2, 9, 11, 5), 24, 3, 1, False),  # odd sizes, 8 + 1 channel blocks
    ((2, 9, 11, 5), 40, 3, 2, True),  # 16 + 16 + 8: padded expand columns
    ((1, 10, 7, 8), 37, 5, 2, True),  # every channel width, a 1-row range
    ((3, 17, 16, 16), 48, 5, 1, False),  # ranges over image boundaries
    ((1, 1, 1, 3), 16, 3, 2, True),  # a window of padding and one row
  ],
)
@pytest.mark.slow
def test_expand_depthwise_matches_unfused(shape, width, k, stride, pooled):
  """An MBConv block's expand + depthwise layers in one kernel (the
  expanded rows computed into a ring as the depthwise loop needs them)
  equal the two layers' own forms: output, SE's squeeze and the gradients
  of x and of the expand weights."""
  rng = np.random.default_rng(0)
  x = _normal(rng, shape)
  w = _normal(rng, (shape[-1], width), 0.5)
  e_scale = _uniform(rng, (width,), 0.5, 1.5)
  e_shift = _normal(rng, (width,), 0.1)
  kernel = _normal(rng, (k, k, width, 1), 0.5)
  scale = _uniform(rng, (width,), 0.5, 1.5)
  shift = _normal(rng, (width,), 0.1)

  def run(x, w, impl):
    return layers.expand_depthwise_affine_act(
      x,
      (w, e_scale, e_shift),
      kernel,
      stride,
      scale,
      shift,
      plain_layers.swish,
      impl=impl,
      pooled=pooled,
    )

  def with_grads(impl):
    loss = lambda x, w: jnp.sum(jax.tree.leaves(run(x, w, impl))[0] ** 2)  # noqa: E731
    return lambda x, w: (run(x, w, impl), jax.grad(loss, argnums=(0, 1))(x, w))

  with cpu_library.forced(True):
    got, g = _run(with_grads('native'), x, w)
    # The forward alone runs the kernel (not only the gradient program).
    forward = jax.jit(lambda x, w: run(x, w, 'native')).lower(x, w)
    text = forward.compile().as_text()
  want, g_want = _run(with_grads('lax'), x, w)
  assert 'EffdetExpandDepthwiseAffineAct' in text
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.shape == b.shape
    assert _rel(a, b) < 1e-5
  for a, b in zip(g, g_want, strict=True):
    assert _rel(a, b) < 1e-5


@pytest.mark.slow
def test_inference_se_squeeze_comes_from_the_depthwise_kernel():
  import effdet_jax

  with cpu_library.forced(True):
    model, variables = effdet_jax.create_model(
      'efficientdet-d0', image_size=(128, 128)
    )
    x = np.zeros((1, 128, 128, 3), np.float32)
    text = (
      jax.jit(lambda v, x: model.apply(v, x, train=False))
      .lower(variables, x)
      .compile()
      .as_text()
    )
  # D0's 16 SE blocks: the 15 with an expand layer run it in the same
  # kernel (the expanded tensor never written), the first alone.
  assert text.count('EffdetExpandDepthwiseAffineActPooled') == 15
  assert text.count('EffdetDepthwiseForwardAffineActPooled') == 1
  assert 'se/reduce_sum' not in text


@pytest.mark.parametrize(
  'shape,n',
  [
    ((2, 5, 7, 16), 96),  # 70 rows: eight-row groups and a tail of 6
    ((3, 4, 4, 40), 32),
    ((1, 1, 3, 64), 16),  # K at its limit, fewer rows than a group
    ((131072, 24), 64),  # 32 MiB out: the streaming-store path
    ((2, 5, 7, 64), 810),  # the class predict's width: a 10-lane last block
    ((3, 4, 4, 64), 36),  # the box predict's (9 anchors x 4)
    ((1, 3, 3, 8), 1),  # one lane
    ((16384, 64), 90),  # 5.6 MiB out, plain stores past a partial block
    ((2, 4, 4, 192), 1152),  # the late blocks' expand (K > 64: inference)
    ((3, 5, 5, 112), 672),
    ((1, 3, 5, 512), 20),  # K at the inference limit
  ],
)
@pytest.mark.parametrize(
  'act', [None, plain_layers.swish, jax.nn.relu, plain_layers.relu6]
)
@pytest.mark.slow
def test_pointwise_affine_act_matches_unfused(shape, n, act):
  """A 1x1 conv + inference BN + activation in one pass (the expand
  layers' inference form), against dot-then-affine; gradients through the
  unfused form."""
  rng = np.random.default_rng(0)
  x = _normal(rng, shape)
  w = _normal(rng, (shape[-1], n), 0.4)
  scale = _normal(rng, (n,), 2.0)
  shift = _normal(rng, (n,))
  cot = _normal(rng, (*shape[:-1], n))

  def unfused(x, w, scale, shift):
    z = jnp.einsum('...c,cd->...d', x, w, precision='highest') * scale + shift
    return z if act is None else act(z)

  def fused(x, w, scale, shift):
    return layers.pointwise_affine_act(x, w, scale, shift, act)

  args = (x, w, scale, shift)
  with cpu_library.forced(True):
    assert native_pointwise.supports(
      x.dtype, shape[-1], n, act, True, native_pointwise.MAX_IN_AFFINE
    )
    (got, g), text = _run(
      _with_grads(fused, (0, 1, 2, 3)), args, cot, text='lowered'
    )
    assert 'EffdetPointwiseAffineAct' in text
  want, g_want = _run(_with_grads(unfused, (0, 1, 2, 3)), args, cot)
  assert _rel(got, want) < 1e-5
  for a, b in zip(g, g_want, strict=True):
    assert _rel(a, b) < 1e-4


def _conv_same(x, k, stride):
  return jax.lax.conv_general_dilated(
    x,
    k,
    (stride, stride),
    'SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    precision='highest',
  )


@pytest.mark.parametrize(
  'size,stride,cin,n',
  [
    ((512, 512), 2, 3, 32),  # the D0 stem at batch 2 (streaming stores)
    ((9, 9), 2, 3, 32),  # odd: a padded row and column never read
    ((7, 10), 1, 3, 20),  # stride 1, a partial channel block
    ((5, 6), 2, 7, 16),  # 63 patch channels, at the kernel's limit
  ],
)
@pytest.mark.slow
def test_im2col_affine_act_matches_conv(size, stride, cin, n):
  """The stem's conv + inference BN + swish from the padded image in one
  kernel (patches gathered per group of pixels) against XLA's convolution
  then the affine and activation; gradients through the jnp form."""
  rng = np.random.default_rng(0)
  x = _normal(rng, (2, *size, cin))
  k = _normal(rng, (3, 3, cin, n), 0.3)
  scale = _normal(rng, (n,))
  shift = _normal(rng, (n,))

  def ref(x, k, scale, shift):
    y = _conv_same(x, k, stride)
    return plain_layers.swish(y * scale + shift)

  def fused(x, k, scale, shift):
    return layers.conv_im2col(x, k, stride, (scale, shift, plain_layers.swish))

  args = (x, k, scale, shift)
  cot = _normal(rng, jax.eval_shape(ref, *args).shape)
  with cpu_library.forced(True):
    # The forward alone (lowered, not compiled): no patch matrix.
    text = jax.jit(fused).lower(*args).as_text()
    assert 'EffdetIm2colAffineAct' in text and 'concatenate' not in text
    got, g = _run(_with_grads(fused, (0, 1, 2, 3)), args, cot)
  want, g_want = _run(_with_grads(ref, (0, 1, 2, 3)), args, cot)
  assert _rel(got, want) < 1e-5
  for a, b in zip(g, g_want, strict=True):
    assert _rel(a, b) < 1e-4


@pytest.mark.parametrize(
  'size,stride,cin,n',
  [
    ((512, 512), 2, 3, 32),  # the D0 stem at batch 2
    ((9, 9), 2, 3, 32),  # odd: a padded row and column never read
    ((7, 10), 1, 3, 20),  # stride 1, a partial vector of D
    ((6, 5), 2, 7, 40),  # 63 patch channels (the limit), runs of 21
  ],
)
@pytest.mark.slow
def test_im2col_conv_train_matches_conv(size, stride, cin, n):
  """The conv alone (the stem in training, its BN after it) from the
  padded image, and its kernel gradient read from the image too (no patch
  matrix either way), against XLA's convolution: value, both gradients."""

  def ref(x, k):
    return _conv_same(x, k, stride)

  def fused(x, k):
    return layers.conv_im2col(x, k, stride)

  # jax.random's draws: at 512 px the kernel gradient's error (sums of
  # 131072 products) is 80% of the bound with them; other draws exceed it.
  shapes = (2, *size, cin), (3, 3, cin, n)
  y = jax.eval_shape(
    ref, *(jax.ShapeDtypeStruct(s, np.float32) for s in shapes)
  )
  x, k, cot = _jax_normal((0, shapes[0]), (1, shapes[1]), (4, y.shape))
  x, k = x + np.float32(0.5), k * np.float32(0.3)
  with cpu_library.forced(True):
    (got, g), text = _run(
      _with_grads(fused, (0, 1)), (x, k), cot, text='lowered'
    )
    assert 'EffdetIm2colWeightGrad' in text
    # The forward alone (lowered, not compiled): no patch matrix.
    text = jax.jit(fused).lower(x, k).as_text()
    assert 'EffdetIm2colAffineAct' in text and 'concatenate' not in text
  want, g_want = _run(_with_grads(ref, (0, 1)), (x, k), cot)
  assert _rel(got, want) < 1e-5
  for a, b in zip(g, g_want, strict=True):
    assert _rel(a, b) < 1e-5


@pytest.mark.parametrize(
  'b,m,p,q',
  [
    (8, 2000, 32, 16),  # block 0's projection (rows: blocks and a tail)
    (2, 999, 144, 24),  # the vectors on x's side: 144 = 9 x 16 lanes
    (1, 70, 27, 32),  # the stem's width: a tile of 24 and one of 3
    (3, 33, 5, 7),  # partial vectors on both sides
    (1, 5, 64, 300),  # fewer rows than a block; 300 = 18 x 16 + 12
  ],
)
def test_weight_grad_matches_einsum(b, m, p, q):
  """x^T dy per image with the sums in registers, against the einsum."""
  rng = np.random.default_rng(0)
  x = _normal(rng, (b, m, p), loc=1.0)
  dy = _normal(rng, (b, m, q))
  want = jax.jit(
    lambda x, dy: jnp.einsum('bnc,bnd->bcd', x, dy, precision='highest')
  )(x, dy)
  with cpu_library.forced(True):
    got = jax.jit(native_weight_grad.weight_grad)(x, dy)
  assert got.shape == (b, p, q)
  assert _rel(got, want) < 2e-6


def test_pointwise_gradients_take_the_weight_grad_kernel():
  """Many rows into few channels (from MIN_ROWS per image) the kernel
  gradients of `pointwise` and of the gated projection come from the
  kernel; below that, XLA's dot. Same values either way."""
  rng = np.random.default_rng(0)
  x = _normal(rng, (2, 128, 128, 32))
  gate = _uniform(rng, (2, 32))
  w = _normal(rng, (32, 16))
  cot = _normal(rng, (2, 128, 128, 16))

  def loss_plain(x, w, cot):
    return jnp.sum(layers.pointwise(x, w) * cot)

  def loss_gated(x, gate, w, cot):
    return jnp.sum(layers.pointwise_gated(x, gate, w) * cot)

  out = {}
  for on in (True, False):
    with cpu_library.forced(on):
      for name, loss, argnums, args in (
        ('plain', loss_plain, (0, 1), (x, w, cot)),
        ('gated', loss_gated, (0, 1, 2), (x, gate, w, cot)),
      ):
        out[on, name], text = _run(
          jax.grad(loss, argnums), *args, text='lowered'
        )
        assert ('EffdetWeightGrad' in text) == on
      small = jax.jit(
        jax.grad(lambda x, w: jnp.sum(layers.pointwise(x, w)), (0, 1))
      ).lower(x[:, :8, :8], w)
      assert 'EffdetWeightGrad' not in small.as_text()
  for name in ('plain', 'gated'):
    for a, b in zip(out[True, name], out[False, name], strict=True):
      assert _rel(a, b) < 1e-5


@pytest.mark.parametrize('n', [810, 36, 64])
def test_pointwise_bias_matches_jnp_with_gradients(n):
  """The predict layers' 1x1 conv + bias (no BN): the bias added as the
  kernel writes the product, in training too; gradients of x, the kernel
  and the bias (pointwise's written-out VJP plus the bias's sum)."""
  rng = np.random.default_rng(0)
  x = _normal(rng, (2, 6, 5, 64))
  w = _normal(rng, (64, n), 0.2)
  b = _normal(rng, (n,))
  cot = _normal(rng, (2, 6, 5, n))

  def fused(x, w, b):
    return layers.pointwise_affine_act(x, w, None, b, None)

  def ref(x, w, b):
    return jnp.einsum('...c,cd->...d', x, w, precision='highest') + b

  with cpu_library.forced(True):
    (got, g), text = _run(
      _with_grads(fused, (0, 1, 2)), (x, w, b), cot, text='lowered'
    )
    assert 'EffdetPointwiseAffineAct' in text
  want, g_want = _run(_with_grads(ref, (0, 1, 2)), (x, w, b), cot)
  assert _rel(got, want) < 1e-5
  for a, b_ in zip(g, g_want, strict=True):
    assert _rel(a, b_) < 1e-4


def test_pointwise_affine_act_leaves_other_shapes_to_jnp():
  """Wide inputs (K > 64) and unknown activations take the jnp form, which
  computes the same function; N not a multiple of 16 only in inference
  (the training kernels want whole 16-channel blocks)."""
  assert not native_pointwise.supports(jnp.float32, 80, 96, plain_layers.swish)
  assert not native_pointwise.supports(jnp.float32, 16, 40, plain_layers.swish)
  assert not native_pointwise.supports(jnp.float32, 16, 96, jnp.tanh)
  assert not native_pointwise.supports(jnp.bfloat16, 16, 96, None)
  rng = np.random.default_rng(0)
  x = _normal(rng, (2, 3, 3, 80))
  w = _normal(rng, (80, 40))
  with cpu_library.forced(True):
    assert native_pointwise.supports(
      jnp.float32, 16, 40, plain_layers.swish, True
    )
    got = jax.jit(
      lambda x, w: layers.pointwise_affine_act(x, w, 2.0, 1.0, jnp.tanh)
    )(x, w)
  want = jax.jit(
    lambda x, w: jnp.tanh(jnp.einsum('...c,cd->...d', x, w) * 2 + 1)
  )(x, w)
  assert _rel(got, want) < 1e-5


@pytest.mark.parametrize(
  'shape,n',
  [
    ((2, 5, 7, 16), 96),  # 70 rows: eight-row groups and a tail of 6
    ((3, 4, 4, 24), 144),  # K: a 16-block and a tail of 8
    ((2, 9, 9, 27), 32),  # the stem's im2col width
    ((1, 1, 3, 64), 16),  # K at its limit, fewer rows than a group
    ((16, 64, 64, 16), 96),  # 65536 rows, 25 MiB out: several flushes
    ((131072, 24), 64),  # 32 MiB out: the streaming-store path
  ],
)
@pytest.mark.parametrize(
  'act', [plain_layers.swish, None, jax.nn.relu, plain_layers.relu6]
)
@pytest.mark.slow
def test_pointwise_bn_train_matches_unfused(shape, n, act):
  """The expand conv + training BN + activation (statistics summed as the
  product is written; a backward that never writes the product's
  gradient) against `pointwise` then `normalize_act_train` in jnp:
  output, batch statistics and all four gradients."""
  if np.prod(shape[:-1]) * n > 2_000_000 and act is not plain_layers.swish:
    # Once is enough; and at millions of values some land within rounding
    # of relu's kink, where the two products' roundings pick other sides.
    pytest.skip('large shapes with swish only')
  rng = np.random.default_rng(0)
  x = _normal(rng, shape, loc=0.5)
  w = _normal(rng, (shape[-1], n), 0.4)
  scale = _normal(rng, (n,), 2.0)
  bias = _normal(rng, (n,))
  cot = _normal(rng, (*shape[:-1], n))
  eps = 1e-3

  def unfused(x, w, scale, bias):
    y = jnp.einsum('...c,cd->...d', x, w, precision='highest')
    return bn_lib.normalize_act_train(y, scale, bias, eps, act)

  def fused(x, w, scale, bias):
    return native_pointwise.pointwise_bn_act_train(x, w, scale, bias, eps, act)

  def run(fn):
    first = lambda out: out[0]  # noqa: E731
    return _run(_with_grads(fn, (0, 1, 2, 3), first), (x, w, scale, bias), cot)

  with cpu_library.forced(False):
    want, g_want = run(unfused)
  with cpu_library.forced(True):
    assert native_pointwise.supports(x.dtype, shape[-1], n, act)
    got, g = run(fused)
  for a, b in zip(got, want, strict=True):
    assert _rel(a, b) < 2e-5
  for a, b in zip(g, g_want, strict=True):
    assert _rel(a, b) < 1e-4


@functools.cache
def _tiny_model(fpn_num_filters: int = 24):
  """A small D0 (64 px, P3-P5) for the whole-model kernel tests; 24 BiFPN
  channels are a 16-block and an 8-block of channels, 32 take the 1x1
  conv + training BN kernel in the BiFPN and heads too. Built once per
  width for the tests here (the variables are immutable arrays)."""
  import effdet_jax

  return effdet_jax.create_model(
    'efficientdet-d0',
    image_size=(64, 64),
    max_level=5,
    num_classes=3,
    fpn_num_filters=fpn_num_filters,
    fpn_cell_repeats=1,
    box_class_repeats=1,
  )


@pytest.mark.slow
def test_model_inference_matches_jnp_forms():
  """A whole (small) EfficientDet in inference mode (the depthwise
  epilogue, the gated projection), with the kernels and with the jnp
  forms."""
  model, variables = _tiny_model()
  # Non-trivial moving statistics, so the epilogue's affine matters.
  rng = np.random.default_rng(5)
  stats = jax.tree.map(
    lambda v: np.asarray(v) + _uniform(rng, v.shape, 0.0, 0.3),
    variables['batch_stats'],
  )
  variables = {**variables, 'batch_stats': stats}
  x = _normal(np.random.default_rng(0), (2, 64, 64, 3))
  out = {}
  for on in (True, False):
    with cpu_library.forced(on):
      out[on] = _run(lambda v, x: model.apply(v, x, train=False), variables, x)
  for a, b in zip(
    jax.tree.leaves(out[True]), jax.tree.leaves(out[False]), strict=True
  ):
    assert _rel(a, b) < 1e-4


@pytest.mark.parametrize('fpn_num_filters', [24, 32])
@pytest.mark.slow
def test_model_train_mode_gradients_match_jnp_forms(fpn_num_filters):
  """A whole (small) EfficientDet in train mode: outputs, new batch stats
  and parameter gradients, with the kernels and with the jnp forms. With
  32 BiFPN channels the BiFPN's and heads' biased 1x1 convs + BN take the
  fused kernel, which leaves the bias out of the product (BN removes it):
  their gradients are exactly zero there, rounding noise in jnp."""
  model, variables = _tiny_model(fpn_num_filters)
  x = _normal(np.random.default_rng(0), (2, 64, 64, 3))

  def loss(params):
    (cls, box), new = model.apply(
      {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
    )
    total = sum(jnp.sum(jnp.sin(c)) for c in cls) + sum(
      jnp.sum(b * b) for b in box
    )
    return total, new

  out, texts = {}, {}
  for on in (True, False):
    with cpu_library.forced(on):
      # Traced, lowered and compiled once; the text is the one run.
      out[on], texts[on] = _run(
        jax.value_and_grad(loss, has_aux=True),
        variables['params'],
        text='lowered',
      )
    assert ('EffdetPointwiseBnForward' in texts[on]) == on
    assert ('EffdetPointwiseBnBackward' in texts[on]) == on
  # The backbone's 5 expand layers over <= 64 input channels; with 32
  # BiFPN channels also the BiFPN's and heads' 1x1 convs.
  fused = texts[True].count('@EffdetPointwiseBnForward(')
  assert fused == 5 if fpn_num_filters == 24 else fused > 5
  (l1, stats1), g1 = out[True]
  (l0, stats0), g0 = out[False]
  assert abs(float(l1) - float(l0)) <= 1e-5 * abs(float(l0))
  for a, b in zip(
    jax.tree.leaves(stats1), jax.tree.leaves(stats0), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Some leaves' true gradient is zero (a bias followed by BN): their
  # values are rounding noise, compared against the largest gradient.
  top = max(float(np.abs(b).max()) for b in jax.tree.leaves(g0))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    err = float(np.abs(np.asarray(a) - np.asarray(b)).max())
    assert err <= 1e-3 * float(np.abs(b).max()) + 1e-6 * top


def test_disabled_by_environment():
  env = dict(os.environ, EFFDET_NATIVE_KERNELS='0')
  code = 'from effdet_jax.cpu import library as c; print(c.load())'
  out = subprocess.run(
    [sys.executable, '-c', code],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  )
  assert out.stdout.strip() == 'False'


@pytest.mark.slow
def test_backend_switch_keeps_custom_calls_out():
  """The backend switch chooses the CPU kernels for the whole model: 'xla'
  (what TPUs and GPUs run, and what export writes: a SavedModel cannot
  carry our custom calls) lowers to no custom call, 'cpu' to the depthwise
  and 1x1 conv + BN kernels."""
  model, variables = _tiny_model()
  x = np.zeros((1, 64, 64, 3), np.float32)
  texts = {}
  with cpu_library.forced(True):
    for name in ('cpu', 'xla'):
      with ops.use_backend(name):
        run = jax.jit(lambda v, x: model.apply(v, x, train=False))
        texts[name] = run.lower(variables, x).as_text()
  assert 'EffdetPointwiseAffineAct' in texts['cpu']
  assert 'EffdetDepthwiseForwardAffineAct' in texts['cpu']
  assert 'Effdet' not in texts['xla']


def test_depthwise_kernel_claims_only_the_strides_it_runs():
  """The kernels are compiled for strides 1 and 2; `supports` sends any
  other stride to the jnp form, which still gives XLA's result."""
  from effdet_jax.cpu import native_depthwise

  assert native_depthwise.supports(jnp.float32, 3, 2)
  assert not native_depthwise.supports(jnp.float32, 3, 3)
  rng = np.random.default_rng(0)
  x = _normal(rng, (1, 9, 9, 16))
  w = _normal(rng, (3, 3, 16, 1))
  with cpu_library.forced(True):
    got = jax.jit(lambda x, w: layers.depthwise_conv(x, w, 3))(x, w)
  want = jax.jit(lambda x, w: layers.depthwise_conv(x, w, 3, 'lax'))(x, w)
  assert _rel(got, want) < 1e-5


def _fusion_jnp(xs, weights, act):
  """bifpn.FNode's fast-attention fusion + act, in jnp (the reference)."""
  r = [jax.nn.relu(w) for w in weights]
  total = r[0]
  for w in r[1:]:
    total = total + w
  total = total + native_fusion.EPSILON
  out = xs[0] * r[0] / total
  for x, w in zip(xs[1:], r[1:], strict=True):
    out = out + x * w / total
  return out if act is None else act(out)


@functools.cache
def _fusion_draws(n, channels, per_channel):
  """The fusion test's inputs, from jax.random (one compiled program per
  shape, shared by the activations): the weights' gradient's error is up
  to 83% of its bound with these draws; other draws exceed it."""

  def draw():
    keys = jax.random.split(jax.random.key(0), n + 2)
    xs = tuple(jax.random.normal(k, (3, 7, 5, channels)) for k in keys[:n])
    shape = (n, channels) if per_channel else (n,)
    weights = jax.random.uniform(keys[n], shape, minval=-0.5, maxval=2.0)
    return xs, weights, jax.random.normal(keys[n + 1], xs[0].shape)

  xs, weights, cot = jax.device_get(jax.jit(draw)())
  weights = np.array(weights)
  weights[0] = -0.3
  return tuple(x * np.float32(2) for x in xs), weights, cot


@pytest.mark.parametrize('n,channels', [(2, 64), (3, 24), (3, 7)])
@pytest.mark.parametrize('per_channel', [False, True])
@pytest.mark.parametrize('act', [plain_layers.swish, jax.nn.relu, None])
@pytest.mark.slow
def test_fast_fusion_act_matches_jnp(n, channels, per_channel, act):
  """Value and gradients (inputs and weights) against the jnp form; one
  weight negative (relu'd to 0, no gradient), channel counts with 8-wide
  and scalar tails, rows that split unevenly over the kernel's chunks."""
  xs, weights, cot = _fusion_draws(n, channels, per_channel)

  def loss(fn, xs, weights, cot):
    return jnp.sum(fn(xs, weights, act) * cot)

  def run(fn):
    # The value and gradients of the loss, and the fused output itself.
    return lambda xs, weights, cot: (
      jax.value_and_grad(loss, (1, 2))(fn, xs, weights, cot),
      fn(xs, weights, act),
    )

  with cpu_library.forced(True):
    assert native_fusion.supports(jnp.float32, n, act)
    got, out = _run(run(native_fusion.fast_fusion_act), xs, weights, cot)
  # The reference in float64: the weights' gradient is a small difference
  # of large sums when one weight carries the node.
  with jax.enable_x64(True):
    f64 = lambda a: jax.tree.map(lambda v: np.asarray(v, np.float64), a)
    want, want_out = _run(run(_fusion_jnp), f64(xs), f64(weights), f64(cot))
  np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-6)
  for g, w in zip(got[1][0], want[1][0], strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1][1], want[1][1], rtol=1e-4, atol=5e-6)
  assert np.all(np.asarray(got[1][1][0]) == 0)


@pytest.mark.parametrize('method', ['fastattn', 'channel_fastattn'])
@pytest.mark.slow
def test_bifpn_node_takes_the_fusion_kernel_in_training(method, monkeypatch):
  """An FNode in training runs `native_fusion` (the custom call is in the
  compiled step) and equals the jnp form, loss and all gradients."""
  from effdet_jax.models import bifpn

  node = bifpn.FNode(
    level=3,
    input_ids=(0, 1),
    node_id=0,
    num_filters=16,
    weight_method=method,
    act=plain_layers.swish,
  )
  rng = np.random.default_rng(0)
  feats = [_normal(rng, (2, 8, 8, 16)), _normal(rng, (2, 4, 4, 16))]
  cot = _normal(rng, (2, 8, 8, 16))
  variables = jax.jit(
    lambda feats: node.init(jax.random.key(1), feats, (8, 8), False)
  )(feats)

  def loss(params, feats):
    out, _ = node.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      feats,
      (8, 8),
      True,
      mutable=['batch_stats'],
    )
    return jnp.sum(out * cot)

  step = jax.value_and_grad(loss, (0, 1))
  with cpu_library.forced(True):
    got, text = _run(step, variables['params'], feats, text='compiled')
    monkeypatch.setattr(native_fusion, 'supports', lambda *a: False)
    jax.clear_caches()
    want, plain = _run(step, variables['params'], feats, text='compiled')
  assert 'EffdetFusionActBackward' in text
  assert 'EffdetFusionAct' not in plain
  assert _rel(got[0], want[0]) < 1e-5
  for g, w in zip(
    jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True
  ):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)
