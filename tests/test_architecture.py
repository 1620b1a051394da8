"""Architecture facts of the official code, written down as tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import effdet_jax
from effdet_jax.models import bifpn, efficientnet


def test_bifpn_node_list_levels_3_7():
  # `efficientdet/tf2/fpn_configs.py: bifpn_config`: fnode inputs for P3-P7.
  nodes = bifpn.bifpn_nodes(3, 7)
  assert nodes == [
    (6, [3, 4]),
    (5, [2, 5]),
    (4, [1, 6]),
    (3, [0, 7]),
    (4, [1, 7, 8]),
    (5, [2, 6, 9]),
    (6, [3, 5, 10]),
    (7, [4, 11]),
  ]


def test_bifpn_node_list_levels_3_8():
  nodes = bifpn.bifpn_nodes(3, 8)
  assert [ids for _, ids in nodes] == [
    [4, 5],
    [3, 6],
    [2, 7],
    [1, 8],
    [0, 9],
    [1, 9, 10],
    [2, 8, 11],
    [3, 7, 12],
    [4, 6, 13],
    [5, 14],
  ]


@pytest.mark.parametrize(
  'name,stem,repeats,endpoints',
  [
    ('efficientnet-b0', 32, 16, (16, 24, 40, 112, 320)),
    ('efficientnet-b3', 40, 26, (24, 32, 48, 136, 384)),
    ('efficientnet-b7', 64, 55, (32, 48, 80, 224, 640)),
    ('efficientnet-lite3', 32, 24, (24, 32, 48, 136, 384)),
    ('efficientnet-lite4', 32, 30, (24, 32, 56, 160, 448)),
  ],
)
def test_backbone_scaling(name, stem, repeats, endpoints):
  spec = efficientnet.backbone_spec(name)
  assert spec.stem_filters == stem
  assert len(spec.blocks) == repeats
  assert tuple(efficientnet.endpoint_channels(spec)) == endpoints


def test_backbone_drop_connect_rule():
  # Off only for names containing 'b0' (lite0 keeps it):
  # `efficientdet/tf2/efficientdet_keras.py: EfficientDetNet.__init__`.
  assert efficientnet.backbone_spec('efficientnet-b0').survival_prob == 0
  assert efficientnet.backbone_spec('efficientnet-lite0').survival_prob == 0.8
  assert efficientnet.backbone_spec('efficientnet-b3').survival_prob == 0.8


def _names(name):
  model = effdet_jax.build_model(effdet_jax.model_config(name))
  v = effdet_jax.api.abstract_variables(model)
  return {
    '/'.join(p): x.shape for p, x in traverse_util.flatten_dict(v).items()
  }


def test_d0_variable_names_mirror_official_scopes():
  names = _names('efficientdet-d0')
  # Cell 0 has five lateral 1x1 conv+BN, later cells none
  # (`efficientdet/tf2/efficientdet_keras.py: FNode.build`).
  lateral = sorted(
    '/'.join(n.split('/')[3:5])
    for n in names
    if n.startswith('params/fpn_cells/cell_0/') and n.endswith('conv2d/kernel')
  )
  assert lateral == [
    'fnode1/resample_0_2_6',
    'fnode2/resample_0_1_7',
    'fnode3/resample_0_0_8',
    'fnode4/resample_0_1_9',
    'fnode5/resample_0_2_10',
  ]
  assert not any('resample' in n for n in names if '/cell_1/' in n)
  assert 'params/resample_p6/conv2d/kernel' in names
  assert not any(n.startswith('params/resample_p7') for n in names)
  # Per-level head BN with real level numbers
  # (`efficientdet/tf2/efficientdet_keras.py: ClassNet`, `BoxNet`).
  for lvl in range(3, 8):
    assert f'batch_stats/class_net/class-2-bn-{lvl}/mean' in names
  assert names['params/class_net/class-predict/pointwise_kernel'] == (
    1,
    1,
    64,
    810,
  )
  assert names[
    'params/backbone/blocks_1/depthwise_conv2d/depthwise_kernel'
  ] == (3, 3, 96, 1)
  # SE reduces from the block's input filters: 16 * 0.25 = 4.
  assert names['params/backbone/blocks_1/se/conv2d/kernel'] == (1, 1, 96, 4)
  assert 'params/fpn_cells/cell_2/fnode4/WSM_2' in names


@pytest.mark.slow
def test_sum_fusion_has_no_weights_and_p8():
  names = _names('efficientdet-d7x')
  assert not any('WSM' in n for n in names)
  assert 'params/fpn_cells/cell_0/fnode9/op_after_combine15/conv/bias' in names
  assert 'params/box_net/box-0-bn-8/scale' in names


@pytest.mark.slow
def test_initialisers_follow_official():
  model, v = effdet_jax.create_model('efficientdet-d0')
  p = v['params']
  bias = np.asarray(p['class_net']['class-predict']['bias'])
  np.testing.assert_allclose(bias, -np.log((1 - 0.01) / 0.01), rtol=1e-6)
  assert np.all(np.asarray(p['fpn_cells']['cell_0']['fnode0']['WSM']) == 1.0)
  # Backbone: N(0, sqrt(2 / fan_out)), fan_out = kh*kw*out.
  k = np.asarray(
    p['backbone']['blocks_15']['conv2d']['kernel']
  )  # 1x1, 192->1152
  assert np.std(k) == pytest.approx(np.sqrt(2 / 1152), rel=0.05)
  # Heads: truncated normal, fan_in; truncated at 2 std.
  pw = np.asarray(p['class_net']['class-0']['pointwise_kernel'])
  std = np.sqrt(1 / 64) / 0.87962566103423978
  assert np.abs(pw).max() <= 2 * std + 1e-6


@pytest.mark.slow
def test_non_multiple_sizes_follow_ceil_halving():
  # lite0 at 320 and lite2 at 448: P7 is 3 and 4
  # (`efficientdet/utils.py: get_feat_sizes`).
  for name, size, p7 in (
    ('efficientdet-lite0', 320, 3),
    ('efficientdet-lite2', 448, 4),
  ):
    model = effdet_jax.build_model(effdet_jax.model_config(name))
    v = effdet_jax.api.abstract_variables(model)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    cls, box = jax.eval_shape(model.apply, v, x)
    assert [c.shape[1] for c in cls][-1] == p7
    assert [c.shape[1] for c in cls][0] == size // 8
