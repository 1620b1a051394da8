"""The compiled XLA:CPU kernels compute what the jnp forms compute.

`effdet_jax/kernels/*.cc` are built with the system C++ compiler on first
use. The facts relied on: depthwise conv with TF SAME padding (pad before
= total // 2), and Keras BN in training mode (batch statistics with the
fast variance E[x^2] - E[x]^2, then the activation), with their gradients;
the summed sigmoid focal loss of one level (fact sheet §6.2) and its
gradient.
"""

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
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), (k, k, shape[-1], 1))
  out = {}
  grads = {}
  for impl in ('native', 'shift', 'lax'):

    def f(x, kernel, impl=impl):
      return layers.depthwise_conv(x, kernel, stride, impl)

    y = jax.jit(f)(x, kernel)
    cot = jax.random.normal(jax.random.key(2), y.shape)
    grads[impl] = jax.jit(
      jax.grad(
        lambda x, w, f=f, cot=cot: jnp.sum(f(x, w) * cot), argnums=(0, 1)
      )
    )(x, kernel)
    out[impl] = y
  assert out['native'].shape == out['lax'].shape
  assert _rel(out['native'], out['lax']) < 1e-5
  assert _rel(out['native'], out['shift']) < 1e-5
  for a, b in zip(grads['native'], grads['lax'], strict=True):
    assert _rel(a, b) < 1e-5


def test_depthwise_kernel_gradient_is_deterministic():
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 48))
  w = jax.random.normal(jax.random.key(1), (3, 3, 48, 1))
  grad = jax.jit(
    jax.grad(lambda w: jnp.sum(layers.depthwise_conv(x, w, 1, 'native') ** 2))
  )
  first = np.asarray(grad(w))
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(grad(w)), first)


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
  x = 3.0 * jax.random.normal(jax.random.key(0), shape) + 1.0
  scale = 10.0 * jax.random.normal(jax.random.key(1), shape[-1:])
  bias = jax.random.normal(jax.random.key(2), shape[-1:])
  cot = jax.random.normal(jax.random.key(3), shape)

  def loss(x, scale, bias):
    y, mean, var = bn_lib.normalize_act_train(x, scale, bias, 1e-3, act)
    return jnp.sum(y * cot), (y, mean, var)

  run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  with cpu_library.forced(True):
    assert native_batch_norm.supports(x.dtype, act)
    native = run(x, scale, bias)
  with cpu_library.forced(False):
    ref = run(x, scale, bias)
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
  x = jax.random.normal(jax.random.key(0), shape) * 2 + 0.5
  c = shape[-1]
  scale = jax.random.normal(jax.random.key(1), (c,))
  bias = jax.random.normal(jax.random.key(2), (c,))
  cot = jax.random.normal(jax.random.key(3), shape)
  cot_pool = jax.random.normal(jax.random.key(4), (shape[0], c)) * 50

  def unfused(x, scale, bias):
    y, mean, var = bn_lib.normalize_act_train(x, scale, bias, 1e-3, act)
    return y, mean, var, bn_lib._pool(y)

  def fused(x, scale, bias):
    return bn_lib.normalize_act_train_pooled(x, scale, bias, 1e-3, act)

  def run(fn):
    def loss(*a):
      y, _, _, pool = fn(*a)
      return jnp.sum(y * cot) + jnp.sum(pool * cot_pool), fn(*a)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

  with cpu_library.forced(True):
    got = run(fused)(x, scale, bias)
    text = jax.jit(fused).lower(x, scale, bias).as_text()
    assert 'EffdetBatchNormForwardPooled' in text
  with cpu_library.forced(False):
    want = run(unfused)(x, scale, bias)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert _rel(a, b) < 2e-5


def test_batch_norm_statistics_keep_precision_with_a_large_mean():
  # E[x^2] - E[x]^2 in f32 over many pixels loses the variance when the
  # mean is large; the kernel sums in double.
  x = 100.0 + jax.random.normal(jax.random.key(0), (8, 64, 64, 16))
  ones, zeros = jnp.ones(16), jnp.zeros(16)
  with cpu_library.forced(True):
    _, mean, var = jax.jit(
      lambda x: bn_lib.normalize_act_train(x, ones, zeros, 1e-3, None)
    )(x)
  xd = np.asarray(x, np.float64).reshape(-1, 16)
  np.testing.assert_allclose(mean, xd.mean(0), rtol=1e-6)
  np.testing.assert_allclose(var, xd.var(0), rtol=1e-3)


def test_batch_norm_propagates_nan():
  # The trainer's NaN guard must still see a NaN loss.
  x = jnp.ones((2, 3, 3, 16)).at[0, 1, 1, 3].set(jnp.nan)
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

  def run(fn):
    loss = lambda x: cot * fn(x, ids, num_classes, 0.25, gamma)
    return jax.jit(jax.value_and_grad(loss))(x)

  native_fn = lambda x, i, c, a, g: native_focal.focal_loss_sum(
    x, i, 1.0, c, a, g
  )
  with cpu_library.forced(True):
    assert native_focal.supports(jnp.float32)
    native = run(native_fn)
    dispatched = run(focal.focal_loss_sum)
  ref = run(focal.focal_loss_sum_jnp)
  for out in (native, dispatched):
    assert _rel(out[0], ref[0]) < 1e-5
    np.testing.assert_allclose(out[1], ref[1], rtol=2e-5, atol=1e-7)


def test_focal_loss_scale_is_applied_in_the_kernel():
  """`scale` (the loss normaliser's inverse) multiplies the sum and the
  gradient written by the kernel, its own gradient is the unscaled sum; and
  with the constant cotangent of a training loss the compiled gradient has
  no multiply over the logits (XLA folds the cotangent away)."""
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 9 * 90)) * 3
  ids = jax.random.randint(jax.random.key(1), (2, 4 * 4 * 9), -1, 90)
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
  want = jax.value_and_grad(loss, (0, 1))(x, 0.125, jnp_form)
  assert _rel(got[0], want[0]) < 1e-5
  np.testing.assert_allclose(got[1][0], want[1][0], rtol=2e-5, atol=1e-8)
  assert _rel(got[1][1], want[1][1]) < 1e-5
  assert not any(
    ' multiply(' in line and '[2,4,4,810]' in line for line in text.splitlines()
  )


def test_focal_loss_flat_streaming_path_matches_jnp():
  """A level over 32 MiB (the kernel's non-temporal gradient stores) with
  anchors split across vectors and chunks: equal to the jnp form."""
  x = jax.random.normal(jax.random.key(0), (2, 24, 24, 9 * 1000)) * 4
  ids = jax.random.randint(jax.random.key(1), (2, 24 * 24 * 9), -2, 1000)
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
  x = jnp.asarray(np.resize(z, (len(z), 24)))  # 16 + 8 lanes per row
  x = x.at[3, 5].set(jnp.nan).at[4, 20].set(jnp.nan)
  eye = jnp.eye(24)
  ones, zeros = jnp.ones(24), jnp.zeros(24)
  with cpu_library.forced(True):
    got = np.asarray(
      jax.jit(native_pointwise.pointwise_affine_act, static_argnums=4)(
        x, eye, ones, zeros, jax.nn.silu
      )
    )
  want = np.asarray(jax.nn.silu(x @ eye))
  assert np.isnan(got[3]).all() and np.isnan(got[4]).all()
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  ok = ~np.isnan(want)
  np.testing.assert_allclose(got[ok], want[ok], rtol=2e-6, atol=1e-30)


def test_focal_loss_is_deterministic_and_propagates_nan():
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 9 * 90)) * 3
  ids = jax.random.randint(jax.random.key(1), (4, 8 * 8 * 9), -1, 90)
  f = jax.jit(lambda x: native_focal.focal_loss_sum(x, ids, 1.0, 90, 0.25, 1.5))
  assert np.asarray(f(x)).tobytes() == np.asarray(f(x)).tobytes()
  assert np.isnan(float(f(x.at[1, 2, 3, 4].set(jnp.nan))))


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
  x = jax.random.normal(jax.random.key(0), shape) * 2
  kernel = jax.random.normal(jax.random.key(1), (k, k, 19, 1))
  scale = jax.random.normal(jax.random.key(2), (19,)) * 3
  shift = jax.random.normal(jax.random.key(3), (19,))

  def unfused(x, kernel, scale, shift):
    z = layers.depthwise_conv(x, kernel, stride, 'lax') * scale + shift
    return z if act is None else act(z)

  def fused(x, kernel, scale, shift):
    return layers.depthwise_conv_affine_act(
      x, kernel, stride, scale, shift, act, impl='native'
    )

  with cpu_library.forced(True):
    got = jax.jit(fused)(x, kernel, scale, shift)
    cot = jax.random.normal(jax.random.key(4), got.shape)
    g = jax.grad(lambda *a: jnp.sum(fused(*a) * cot), argnums=(0, 1, 2, 3))(
      x, kernel, scale, shift
    )
  want = unfused(x, kernel, scale, shift)
  g_want = jax.grad(
    lambda *a: jnp.sum(unfused(*a) * cot), argnums=(0, 1, 2, 3)
  )(x, kernel, scale, shift)
  assert _rel(got, want) < 1e-5
  for a, b in zip(g, g_want, strict=True):
    assert _rel(a, b) < 1e-4


@pytest.mark.parametrize('k,stride', [(3, 1), (3, 2), (5, 2)])
def test_depthwise_affine_act_pooled_matches_unfused(k, stride):
  """The inference epilogue with SE's squeeze summed per output row as the
  kernel writes it: output and per-image channel means equal the unfused
  form's; the means' gradient too; and an inference model's SE blocks use
  it (no separate reduction over the depthwise output)."""
  x = jax.random.normal(jax.random.key(0), (3, 11, 9, 21)) * 2
  kernel = jax.random.normal(jax.random.key(1), (k, k, 21, 1))
  scale = jax.random.normal(jax.random.key(2), (21,)) * 3
  shift = jax.random.normal(jax.random.key(3), (21,))

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

  def mean_grad(impl):
    return jax.grad(lambda x: jnp.sum(run(x, impl)[1]))(x)

  with cpu_library.forced(True):
    got = jax.jit(lambda x: run(x, 'native'))(x)
    g = mean_grad('native')
  want = run(x, 'lax')
  g_want = mean_grad('lax')
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
  keys = jax.random.split(jax.random.key(0), 7)
  x = jax.random.normal(keys[0], shape)
  w = jax.random.normal(keys[1], (shape[-1], width)) * 0.5
  e_scale = jax.random.uniform(keys[2], (width,), minval=0.5, maxval=1.5)
  e_shift = jax.random.normal(keys[3], (width,)) * 0.1
  kernel = jax.random.normal(keys[4], (k, k, width, 1)) * 0.5
  scale = jax.random.uniform(keys[5], (width,), minval=0.5, maxval=1.5)
  shift = jax.random.normal(keys[6], (width,)) * 0.1

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

  def grads(impl):
    loss = lambda x, w: jnp.sum(jax.tree.leaves(run(x, w, impl))[0] ** 2)  # noqa: E731
    return jax.grad(loss, argnums=(0, 1))(x, w)

  with cpu_library.forced(True):
    fn = jax.jit(lambda x, w: run(x, w, 'native'))
    got = fn(x, w)
    text = fn.lower(x, w).compile().as_text()
    g = grads('native')
  want = run(x, w, 'lax')
  assert 'EffdetExpandDepthwiseAffineAct' in text
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.shape == b.shape
    assert _rel(a, b) < 1e-5
  for a, b in zip(g, grads('lax'), strict=True):
    assert _rel(a, b) < 1e-5


@pytest.mark.slow
def test_inference_se_squeeze_comes_from_the_depthwise_kernel():
  import effdet_jax

  with cpu_library.forced(True):
    model, variables = effdet_jax.create_model(
      'efficientdet-d0', image_size=(128, 128)
    )
    x = jnp.zeros((1, 128, 128, 3))
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
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (shape[-1], n)) * 0.4
  scale = jax.random.normal(jax.random.key(2), (n,)) * 2
  shift = jax.random.normal(jax.random.key(3), (n,))

  def unfused(x, w, scale, shift):
    z = jnp.einsum('...c,cd->...d', x, w, precision='highest') * scale + shift
    return z if act is None else act(z)

  def fused(x, w, scale, shift):
    return layers.pointwise_affine_act(x, w, scale, shift, act)

  with cpu_library.forced(True):
    assert native_pointwise.supports(
      x.dtype, shape[-1], n, act, True, native_pointwise.MAX_IN_AFFINE
    )
    assert (
      'EffdetPointwiseAffineAct'
      in jax.jit(fused).lower(x, w, scale, shift).as_text()
    )
    got = jax.jit(fused)(x, w, scale, shift)
    cot = jax.random.normal(jax.random.key(4), got.shape)
    g = jax.grad(lambda *a: jnp.sum(fused(*a) * cot), argnums=(0, 1, 2, 3))(
      x, w, scale, shift
    )
  want = unfused(x, w, scale, shift)
  assert _rel(got, want) < 1e-5
  g_want = jax.grad(
    lambda *a: jnp.sum(unfused(*a) * cot), argnums=(0, 1, 2, 3)
  )(x, w, scale, shift)
  for a, b in zip(g, g_want, strict=True):
    assert _rel(a, b) < 1e-4


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
  x = jax.random.normal(jax.random.key(0), (2, *size, cin))
  k = jax.random.normal(jax.random.key(1), (3, 3, cin, n)) * 0.3
  scale = jax.random.normal(jax.random.key(2), (n,))
  shift = jax.random.normal(jax.random.key(3), (n,))

  def ref(x, k, scale, shift):
    y = jax.lax.conv_general_dilated(
      x,
      k,
      (stride, stride),
      'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision='highest',
    )
    return plain_layers.swish(y * scale + shift)

  def fused(x, k, scale, shift):
    return layers.conv_im2col(x, k, stride, (scale, shift, plain_layers.swish))

  with cpu_library.forced(True):
    text = jax.jit(fused).lower(x, k, scale, shift).as_text()
    assert 'EffdetIm2colAffineAct' in text and 'concatenate' not in text
    got = jax.jit(fused)(x, k, scale, shift)
    cot = jax.random.normal(jax.random.key(4), got.shape)
    g = jax.grad(lambda *a: jnp.sum(fused(*a) * cot), argnums=(0, 1, 2, 3))(
      x, k, scale, shift
    )
  assert _rel(got, ref(x, k, scale, shift)) < 1e-5
  g_want = jax.grad(lambda *a: jnp.sum(ref(*a) * cot), argnums=(0, 1, 2, 3))(
    x, k, scale, shift
  )
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
  x = jax.random.normal(jax.random.key(0), (2, *size, cin)) + 0.5
  k = jax.random.normal(jax.random.key(1), (3, 3, cin, n)) * 0.3

  def ref(x, k):
    return jax.lax.conv_general_dilated(
      x,
      k,
      (stride, stride),
      'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision='highest',
    )

  def fused(x, k):
    return layers.conv_im2col(x, k, stride)

  cot = jax.random.normal(jax.random.key(4), ref(x, k).shape)
  grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * cot), (0, 1))  # noqa: E731
  with cpu_library.forced(True):
    text = jax.jit(grad(fused)).lower(x, k).as_text()
    assert 'EffdetIm2colWeightGrad' in text
    text = jax.jit(fused).lower(x, k).as_text()
    assert 'EffdetIm2colAffineAct' in text and 'concatenate' not in text
    got = jax.jit(fused)(x, k)
    g = jax.jit(grad(fused))(x, k)
  assert _rel(got, ref(x, k)) < 1e-5
  for a, b in zip(g, grad(ref)(x, k), strict=True):
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
  x = jax.random.normal(jax.random.key(0), (b, m, p)) + 1.0
  dy = jax.random.normal(jax.random.key(1), (b, m, q))
  want = jnp.einsum('bnc,bnd->bcd', x, dy, precision='highest')
  with cpu_library.forced(True):
    got = jax.jit(native_weight_grad.weight_grad)(x, dy)
  assert got.shape == (b, p, q)
  assert _rel(got, want) < 2e-6


def test_pointwise_gradients_take_the_weight_grad_kernel():
  """Many rows into few channels (from MIN_ROWS per image) the kernel
  gradients of `pointwise` and of the gated projection come from the
  kernel; below that, XLA's dot. Same values either way."""
  x = jax.random.normal(jax.random.key(0), (2, 128, 128, 32))
  gate = jax.random.uniform(jax.random.key(1), (2, 32))
  w = jax.random.normal(jax.random.key(2), (32, 16))
  cot = jax.random.normal(jax.random.key(3), (2, 128, 128, 16))

  def loss_plain(x, w):
    return jnp.sum(layers.pointwise(x, w) * cot)

  def loss_gated(x, gate, w):
    return jnp.sum(layers.pointwise_gated(x, gate, w) * cot)

  plain = jax.jit(jax.grad(loss_plain, (0, 1)))
  gated = jax.jit(jax.grad(loss_gated, (0, 1, 2)))
  out = {}
  for on in (True, False):
    with cpu_library.forced(on):
      for name, fn, args in (
        ('plain', plain, (x, w)),
        ('gated', gated, (x, gate, w)),
      ):
        text = fn.lower(*args).as_text()
        assert ('EffdetWeightGrad' in text) == on
        out[on, name] = fn(*args)
    with cpu_library.forced(on):
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
  x = jax.random.normal(jax.random.key(0), (2, 6, 5, 64))
  w = jax.random.normal(jax.random.key(1), (64, n)) * 0.2
  b = jax.random.normal(jax.random.key(2), (n,))
  cot = jax.random.normal(jax.random.key(3), (2, 6, 5, n))

  def fused(x, w, b):
    return layers.pointwise_affine_act(x, w, None, b, None)

  def ref(x, w, b):
    return jnp.einsum('...c,cd->...d', x, w, precision='highest') + b

  with cpu_library.forced(True):
    assert 'EffdetPointwiseAffineAct' in jax.jit(fused).lower(x, w, b).as_text()
    got = jax.jit(fused)(x, w, b)
    g = jax.grad(lambda *a: jnp.sum(fused(*a) * cot), (0, 1, 2))(x, w, b)
  assert _rel(got, ref(x, w, b)) < 1e-5
  g_want = jax.grad(lambda *a: jnp.sum(ref(*a) * cot), (0, 1, 2))(x, w, b)
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
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 80))
  w = jax.random.normal(jax.random.key(1), (80, 40))
  with cpu_library.forced(True):
    assert native_pointwise.supports(
      jnp.float32, 16, 40, plain_layers.swish, True
    )
    got = layers.pointwise_affine_act(x, w, 2.0, 1.0, jnp.tanh)
  assert _rel(got, jnp.tanh(jnp.einsum('...c,cd->...d', x, w) * 2 + 1)) < 1e-5


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
  x = jax.random.normal(jax.random.key(0), shape) + 0.5
  w = jax.random.normal(jax.random.key(1), (shape[-1], n)) * 0.4
  scale = jax.random.normal(jax.random.key(2), (n,)) * 2
  bias = jax.random.normal(jax.random.key(3), (n,))
  eps = 1e-3

  def unfused(x, w, scale, bias):
    y = jnp.einsum('...c,cd->...d', x, w, precision='highest')
    return bn_lib.normalize_act_train(y, scale, bias, eps, act)

  def fused(x, w, scale, bias):
    return native_pointwise.pointwise_bn_act_train(x, w, scale, bias, eps, act)

  def grads(fn, cot):
    loss = lambda *a: jnp.sum(fn(*a)[0] * cot)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, w, scale, bias)

  with cpu_library.forced(False):
    want = jax.jit(unfused)(x, w, scale, bias)
    cot = jax.random.normal(jax.random.key(4), want[0].shape)
    g_want = grads(unfused, cot)
  with cpu_library.forced(True):
    assert native_pointwise.supports(x.dtype, shape[-1], n, act)
    got = jax.jit(fused)(x, w, scale, bias)
    g = grads(fused, cot)
  for a, b in zip(got, want, strict=True):
    assert _rel(a, b) < 2e-5
  for a, b in zip(g, g_want, strict=True):
    assert _rel(a, b) < 1e-4


def _tiny_model(fpn_num_filters: int = 24):
  """A small D0 (64 px, P3-P5) for the whole-model kernel tests; 24 BiFPN
  channels are a 16-block and an 8-block of channels, 32 take the 1x1
  conv + training BN kernel in the BiFPN and heads too."""
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
  stats = jax.tree.map(
    lambda v: v + 0.3 * jax.random.uniform(jax.random.key(5), v.shape),
    variables['batch_stats'],
  )
  variables = {**variables, 'batch_stats': stats}
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  run = jax.jit(lambda v, x: model.apply(v, x, train=False))
  out = {}
  for on in (True, False):
    with cpu_library.forced(on):
      out[on] = run(variables, x)
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
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))

  def loss(params):
    (cls, box), new = model.apply(
      {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
    )
    total = sum(jnp.sum(jnp.sin(c)) for c in cls) + sum(
      jnp.sum(b * b) for b in box
    )
    return total, new

  run = jax.jit(jax.value_and_grad(loss, has_aux=True))
  out, texts = {}, {}
  for on in (True, False):
    with cpu_library.forced(on):
      out[on] = run(variables['params'])
      texts[on] = run.lower(variables['params']).as_text()
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
  x = jnp.zeros((1, 64, 64, 3))
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
  x = jax.random.normal(jax.random.key(0), (1, 9, 9, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 1))
  with cpu_library.forced(True):
    got = layers.depthwise_conv(x, w, 3)
  assert _rel(got, layers.depthwise_conv(x, w, 3, 'lax')) < 1e-5


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


@pytest.mark.parametrize('n,channels', [(2, 64), (3, 24), (3, 7)])
@pytest.mark.parametrize('per_channel', [False, True])
@pytest.mark.parametrize('act', [plain_layers.swish, jax.nn.relu, None])
@pytest.mark.slow
def test_fast_fusion_act_matches_jnp(n, channels, per_channel, act):
  """Value and gradients (inputs and weights) against the jnp form; one
  weight negative (relu'd to 0, no gradient), channel counts with 8-wide
  and scalar tails, rows that split unevenly over the kernel's chunks."""
  keys = jax.random.split(jax.random.key(0), n + 2)
  xs = tuple(jax.random.normal(k, (3, 7, 5, channels)) * 2 for k in keys[:n])
  shape = (n, channels) if per_channel else (n,)
  weights = jax.random.uniform(keys[n], shape, minval=-0.5, maxval=2.0)
  weights = weights.at[0].set(-0.3)
  cot = jax.random.normal(keys[n + 1], xs[0].shape)

  def loss(fn, xs, weights):
    return jnp.sum(fn(xs, weights, act) * cot)

  with cpu_library.forced(True):
    assert native_fusion.supports(jnp.float32, n, act)
    got = jax.jit(jax.value_and_grad(loss, (1, 2)), static_argnums=0)(
      native_fusion.fast_fusion_act, xs, weights
    )
  # The reference in float64: the weights' gradient is a small difference
  # of large sums when one weight carries the node.
  with jax.enable_x64(True):
    f64 = lambda a: jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), a)
    want = jax.value_and_grad(loss, (1, 2))(_fusion_jnp, f64(xs), f64(weights))
    cot = f64(cot)
    want_out = _fusion_jnp(f64(xs), f64(weights), act)
  with cpu_library.forced(True):
    out = native_fusion.fast_fusion_act(xs, weights, act)
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
  keys = jax.random.split(jax.random.key(0), 3)
  feats = [
    jax.random.normal(keys[0], (2, 8, 8, 16)),
    jax.random.normal(keys[1], (2, 4, 4, 16)),
  ]
  cot = jax.random.normal(keys[2], (2, 8, 8, 16))
  variables = node.init(jax.random.key(1), feats, (8, 8), False)

  def loss(params, feats):
    out, _ = node.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      feats,
      (8, 8),
      True,
      mutable=['batch_stats'],
    )
    return jnp.sum(out * cot)

  step = jax.jit(jax.value_and_grad(loss, (0, 1)))
  with cpu_library.forced(True):
    text = step.lower(variables['params'], feats).compile().as_text()
    got = step(variables['params'], feats)
    monkeypatch.setattr(native_fusion, 'supports', lambda *a: False)
    jax.clear_caches()
    want = step(variables['params'], feats)
    plain = step.lower(variables['params'], feats).compile().as_text()
  assert 'EffdetFusionActBackward' in text
  assert 'EffdetFusionAct' not in plain
  assert _rel(got[0], want[0]) < 1e-5
  for g, w in zip(
    jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True
  ):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)
