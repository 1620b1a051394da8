"""The backend seam (`effdet_jax.ops`): one switch, plain models, and the
CPU package's forms computing what the plain forms compute."""

import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effdet_jax
from effdet_jax import cpu, ops
from effdet_jax.models import bifpn, efficientnet, heads  # noqa: F401

PACKAGE = pathlib.Path(effdet_jax.__file__).parent


def test_models_and_detection_hold_no_backend_code():
  """The model and the detection core are plain Flax/lax/jnp: nothing in
  them reaches the CPU package except through `ops.backend_form`."""
  pattern = re.compile(r'native_|cpu_library|kernels|malloc|effdet_jax\.cpu')
  found = [
    f'{path.relative_to(PACKAGE)}:{n}'
    for folder in ('models', 'detection')
    for path in sorted((PACKAGE / folder).glob('*.py'))
    for n, line in enumerate(path.read_text().splitlines(), 1)
    if pattern.search(line)
  ]
  assert not found
  sizes = {
    p.name: len(p.read_text().splitlines())
    for p in (PACKAGE / 'models').glob('*.py')
  }
  assert max(sizes.values()) <= 400, sizes


def test_every_named_form_has_a_plain_form_and_the_cpu_ones_fit_it():
  from effdet_jax import detection  # noqa: F401
  from effdet_jax.detection import losses, targets  # noqa: F401

  plain = ops.plain_forms()
  assert set(plain) == set(ops.FORMS)
  for name, form in cpu.forms().items():
    want = list(inspect.signature(plain[name]).parameters)
    got = list(inspect.signature(form).parameters)
    # A form takes the plain function first, then the plain arguments.
    assert got[0] == 'plain' and len(got) == len(want) + 1, name


def test_switch_resolves_validates_and_restores():
  assert ops.backend() in ('cpu', 'xla')
  before = ops.backend()
  with pytest.raises(ValueError, match='unknown backend'):
    ops.set_backend('tpu_kernels')
  assert ops.backend() == before
  with ops.use_backend('xla') as name:
    assert name == ops.backend() == 'xla'
  assert ops.backend() == before
  # On a CPU host 'auto' is the CPU package.
  with ops.use_backend('auto') as name:
    assert name == 'cpu'


def _tiny(fpn_num_filters=24):
  return effdet_jax.create_model(
    'efficientdet-d0',
    # B0's block forms (stem; MBConv without expand, with expand, with the
    # identity skip), ten blocks at half width: what is compared here is
    # each form on the two backends, not the depth.
    backbone_name='efficientnet-b0-tiny',
    image_size=(64, 64),
    max_level=5,
    num_classes=3,
    fpn_num_filters=fpn_num_filters,
    fpn_cell_repeats=1,
    box_class_repeats=2,
  )


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize('kernels', [False, True], ids=['jnp', 'kernels'])
@pytest.mark.slow
def test_cpu_blocks_compute_the_plain_blocks(kernels):
  """A whole small EfficientDet (every block form: stem, MBConv with and
  without expand/SE, BiFPN nodes, heads) on the two backends, with the
  same variables: inference outputs, training outputs, the new BN
  statistics and every parameter gradient. `kernels`: the CPU package
  with its C++ kernels on (as on one CPU device) or off (on a mesh)."""
  from effdet_jax.cpu import library

  if kernels and not library.load():
    pytest.skip('no C++ compiler: the kernels are never used')
  model, variables = _tiny()
  stats = jax.tree.map(
    lambda v: v + 0.3 * jax.random.uniform(jax.random.key(5), v.shape),
    variables['batch_stats'],
  )
  variables = {**variables, 'batch_stats': stats}
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))

  def loss(params):
    (cls, box), new = model.apply(
      {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
    )
    total = sum(jnp.sum(jnp.sin(c)) for c in cls) + sum(
      jnp.sum(b * b) for b in box
    )
    return total, new

  out = {}
  for name in ('xla', 'cpu'):
    with ops.use_backend(name), library.forced(kernels):
      infer = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
      train = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables['params']
      )
      out[name] = infer, train
  (i1, ((l1, s1), g1)), (i0, ((l0, s0), g0)) = out['cpu'], out['xla']
  for a, b in zip(jax.tree.leaves(i1), jax.tree.leaves(i0), strict=True):
    assert _rel(a, b) < 1e-4
  assert abs(float(l1) - float(l0)) <= 1e-5 * abs(float(l0))
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Some true gradients are zero (a bias followed by BN): rounding noise,
  # compared against the largest gradient.
  top = max(float(np.abs(b).max()) for b in jax.tree.leaves(g0))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    err = float(np.abs(np.asarray(a) - np.asarray(b)).max())
    assert err <= 1e-3 * float(np.abs(b).max()) + 1e-6 * top
