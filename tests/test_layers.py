"""Layer semantics against TensorFlow itself (the official code's runtime)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effdet_jax import ops
from effdet_jax.cpu import layers as cpu_layers
from effdet_jax.models import layers

tf = pytest.importorskip('tensorflow')


@pytest.mark.parametrize('size', [(9, 9), (8, 8), (7, 10), (1, 2)])
@pytest.mark.parametrize('kernel,stride', [(3, 1), (3, 2), (5, 1), (5, 2)])
def test_depthwise_shift_equals_lax_and_tf(size, kernel, stride):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *size, 6)).astype(np.float32)
  k = rng.standard_normal((kernel, kernel, 6, 1)).astype(np.float32)
  shift = cpu_layers.depthwise_conv(x, k, stride, impl='shift')
  with ops.use_backend('xla'):
    plain = layers.depthwise_conv2d(x, k, stride)
  ref = tf.nn.depthwise_conv2d(x, k, [1, stride, stride, 1], 'SAME').numpy()
  np.testing.assert_allclose(shift, ref, atol=1e-5)
  np.testing.assert_allclose(plain, ref, atol=1e-5)


@pytest.mark.parametrize('stride', [1, 2])
def test_depthwise_gradients_agree(stride):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 11, 8, 5)).astype(np.float32)
  k = rng.standard_normal((5, 5, 5, 1)).astype(np.float32)
  w = rng.standard_normal((2, -(-11 // stride), -(-8 // stride), 5))

  def loss(impl):
    return lambda x, k: jnp.sum(
      cpu_layers.depthwise_conv(x, k, stride, impl) * w
    )

  gs = jax.grad(loss('shift'), argnums=(0, 1))(x, k)
  gl = jax.grad(loss('lax'), argnums=(0, 1))(x, k)
  for a, b in zip(gs, gl, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('size', [(4, 5), (32, 40)])
def test_gated_pointwise_equals_gating_first_and_its_gradients(size):
  """Squeeze-excitation's gate folded into the 1x1 kernel (per image) is
  gate * x, then the conv: values and all three gradients. (4, 5) takes
  the small-image path, (32, 40) the folded one."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((3, *size, 6)).astype(np.float32)
  gate = rng.uniform(0, 1, (3, 6)).astype(np.float32)
  k = rng.standard_normal((6, 4)).astype(np.float32)
  w = rng.standard_normal((3, *size, 4)).astype(np.float32)
  gated_first = lambda x, g, k: jnp.einsum(
    'bhwc,cd->bhwd', g[:, None, None] * x, k
  )
  np.testing.assert_allclose(
    cpu_layers.pointwise_gated(x, gate, k),
    gated_first(x, gate, k),
    rtol=1e-5,
    atol=1e-5,
  )
  grads = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(
    x, gate, k
  )
  for a, b in zip(
    grads(cpu_layers.pointwise_gated), grads(gated_first), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('size', [(9, 9), (8, 8), (7, 10), (1, 2)])
@pytest.mark.parametrize('stride', [1, 2])
def test_im2col_conv_equals_tf_conv_and_its_gradient(size, stride):
  """The stem's CPU form (patches x kernel) is TF's SAME conv, with the
  same kernel gradient as XLA's convolution."""
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, *size, 3)).astype(np.float32)
  k = rng.standard_normal((3, 3, 3, 8)).astype(np.float32)
  ref = tf.nn.conv2d(x, k, [1, stride, stride, 1], 'SAME').numpy()
  np.testing.assert_allclose(
    cpu_layers.conv_im2col(x, k, stride), ref, rtol=1e-5, atol=1e-5
  )
  w = rng.standard_normal(ref.shape).astype(np.float32)
  lax_conv = lambda k: jax.lax.conv_general_dilated(
    x, k, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  g_ref = jax.grad(lambda k: jnp.sum(lax_conv(k) * w))(k)
  g = jax.grad(lambda k: jnp.sum(cpu_layers.conv_im2col(x, k, stride) * w))(k)
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_tf_same_padding_is_asymmetric():
  # TF SAME: extra padding goes bottom/right for stride-2 layers.
  assert layers.same_padding(8, 3, 2) == (0, 1)
  assert layers.same_padding(8, 5, 2) == (1, 2)
  assert layers.same_padding(7, 3, 1) == (1, 1)
  assert layers.same_padding(9, 3, 2) == (1, 1)


@pytest.mark.parametrize(
  'hw,out',
  [((2, 2), (4, 4)), ((3, 3), (5, 5)), ((4, 4), (7, 7)), ((3, 2), (5, 4))],
)
def test_nearest_resize_matches_tf1(hw, out):
  x = np.random.default_rng(2).standard_normal((1, *hw, 3)).astype(np.float32)
  ours = layers.resize_nearest_legacy(jnp.asarray(x), *out)
  ref = tf.compat.v1.image.resize_nearest_neighbor(x, out).numpy()
  np.testing.assert_array_equal(np.asarray(ours), ref)


@pytest.mark.parametrize('size', [5, 8, 3, 2])
def test_max_pool_same_matches_tf(size):
  x = (
    np.random.default_rng(3)
    .standard_normal((1, size, size, 4))
    .astype(np.float32)
  )
  x -= 10  # padded cells must never win, even against negatives
  ours = cpu_layers.max_pool_same(jnp.asarray(x), 3, 2, 'shift')
  with ops.use_backend('xla'):
    plain = layers.max_pool2d(jnp.asarray(x), 3, 2)
  ref = tf.nn.max_pool2d(x, 3, 2, 'SAME').numpy()
  np.testing.assert_array_equal(np.asarray(ours), ref)
  np.testing.assert_array_equal(np.asarray(plain), ref)


@pytest.mark.parametrize(
  'hw,window,stride',
  [
    ((5, 5), 3, 2),
    ((7, 9), 3, 2),
    ((1, 1), 3, 2),
    ((64, 64), 3, 2),
    ((9, 9), 4, 3),
    ((4, 4), 1, 2),
    ((5, 5), 3, 1),
  ],
)
@pytest.mark.parametrize('ties', [False, True])
def test_max_pool_same_gradient_matches_tf(hw, window, stride, ties):
  """The tap form's VJP routes each output's gradient to the window's first
  maximum (row-major), as TF's MaxPoolGrad does; rounded inputs make ties."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, *hw, 4)).astype(np.float32) - 10
  if ties:
    x = np.round(x)
  out_hw = tuple(-(-n // stride) for n in hw)
  g = rng.standard_normal((2, *out_hw, 4)).astype(np.float32)
  ours, vjp = jax.vjp(
    lambda v: cpu_layers.max_pool_same(v, window, stride), jnp.asarray(x)
  )
  xt = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(xt)
    ref = tf.nn.max_pool2d(xt, window, stride, 'SAME')
  dref = tape.gradient(ref, xt, output_gradients=tf.constant(g)).numpy()
  np.testing.assert_array_equal(np.asarray(ours), ref.numpy())
  # Overlapping windows add in another order: equal to rounding.
  np.testing.assert_allclose(
    np.asarray(vjp(jnp.asarray(g))[0]), dref, rtol=0, atol=1e-6
  )


def test_drop_connect_is_per_sample_and_unbiased():
  x = jnp.ones((4000, 2, 2, 3))
  y = layers.drop_connect(x, 0.8, jax.random.PRNGKey(0))
  per_sample = np.asarray(y[:, 0, 0, 0])
  assert set(np.unique(per_sample).round(4)) <= {0.0, 1.25}
  assert np.all(np.asarray(y).reshape(4000, -1) == per_sample[:, None])
  assert abs(per_sample.mean() - 1.0) < 0.05
  np.testing.assert_array_equal(layers.drop_connect(x, 0.8, None), x)


def test_activations():
  x = jnp.linspace(-8, 8, 33)
  np.testing.assert_allclose(
    layers.activation('swish')(x), tf.nn.swish(np.asarray(x)).numpy(), atol=1e-6
  )
  np.testing.assert_allclose(
    layers.activation('relu6')(x), tf.nn.relu6(np.asarray(x)).numpy()
  )
  with pytest.raises(ValueError, match='valid'):
    layers.activation('gelu_typo')


def _split_over_two_devices_by_height(shape):
  """An f32 input spec whose H is split over a 2-device `spatial` mesh."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec

  mesh = jax.make_mesh(
    (2,), ('spatial',), axis_types=(AxisType.Auto,), devices=jax.devices()[:2]
  )
  return jax.ShapeDtypeStruct(
    shape,
    jnp.float32,
    sharding=NamedSharding(mesh, PartitionSpec(None, 'spatial')),
  )


def test_stem_conv_keeps_a_spatial_split_with_lax_impl():
  """On a `spatial` mesh the stem must not gather the image: XLA's conv
  keeps the H split (the 'lax' form, what TPUs run and plan_memory
  compiles), while the CPU im2col form's stride-2 view of an odd padded
  height (64 + 1 + 1 = 66 rows -> 33 x 2) makes GSPMD gather it."""
  x = _split_over_two_devices_by_height((1, 64, 64, 3))

  def hlo(impl):
    conv = cpu_layers.Conv(8, 3, 2, use_bias=False, impl=impl)
    variables = conv.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    fn = jax.jit(lambda v, x: conv.apply(v, x))
    return fn.lower(variables, x).compile().as_text()

  assert 'all-gather' not in hlo('lax')
  assert 'all-gather' in hlo('shift')


def test_max_pool_keeps_a_spatial_split_with_lax_impl():
  """As for the stem: the BiFPN's pool in the cpu backend's tap form would
  gather, and 'lax'
  (XLA's reduce-window) keeps the H split of a 64-row map whose padded
  height (65 + 1 = 66 rows -> 33 x 2) the tap form's view would gather.
  Both forms give the same values."""
  x = _split_over_two_devices_by_height((1, 64, 64, 8))

  def hlo(impl):
    fn = jax.jit(
      jax.grad(lambda v: cpu_layers.max_pool_same(v, 3, 2, impl).sum())
    )
    return fn.lower(x).compile().as_text()

  assert 'all-gather' not in hlo('lax')
  assert 'all-gather' in hlo('shift')
  v = jax.random.normal(jax.random.PRNGKey(0), (1, 64, 64, 8))
  np.testing.assert_array_equal(
    np.asarray(cpu_layers.max_pool_same(v, 3, 2, 'lax')),
    np.asarray(cpu_layers.max_pool_same(v, 3, 2, 'shift')),
  )
