"""Parity with rwightman's `effdet` 0.4.1 (PyTorch) on the same random weights.

effdet's `tf_efficientdet_*` models are ports of the official weights (TF SAME
padding, redundant biases kept), so with identical weights every output level
must agree within 1e-4 * max(1, max|reference|). BN running statistics are
randomised too, so a BN read from the wrong place cannot hide.
"""

import jax
import numpy as np
import pytest
from torch_ref import import_effdet

import effdet_jax
from effdet_jax import ops
from effdet_jax.convert import effdet_torch

CASES = [
  # (effdet name, our name, input size, extra overrides)
  ('tf_efficientdet_d0', 'efficientdet-d0', 256),
  # 320 is not a multiple of 2**7: ceil-halving sizes, P7 3x3 -> P6 5x5.
  ('tf_efficientdet_lite0', 'efficientdet-lite0', 320),
  # P8, 'sum' fusion and the B7 backbone, at a reduced size.
  ('tf_efficientdet_d7x', 'efficientdet-d7x', 256),
]


def _randomise(model, torch, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'edge_weights' in name:
        p.copy_(torch.rand(p.shape, generator=g) + 0.5)
      elif p.ndim > 1:
        fan_in = p[0].numel()
        # Amplify the predict layers (as the official oracle does) so the
        # outputs are dominated by the input signal, not by the biases.
        gain = 10.0 if 'predict.conv_pw' in name else 1.0
        p.copy_(torch.randn(p.shape, generator=g) * gain / np.sqrt(fan_in))
      else:
        p.copy_(
          torch.randn(p.shape, generator=g) * 0.1
          + (1.0 if 'bn' in name and name.endswith('weight') else 0.0)
        )
    for name, b in model.named_buffers():
      if name.endswith('running_mean'):
        b.copy_(torch.randn(b.shape, generator=g) * 0.1)
      elif name.endswith('running_var'):
        b.copy_(torch.rand(b.shape, generator=g) * 0.5 + 0.75)


@pytest.mark.parametrize('backend', ['xla', 'cpu'])
@pytest.mark.parametrize('ref_name,name,size', CASES, ids=[c[1] for c in CASES])
@pytest.mark.slow
def test_effdet_parity(ref_name, name, size, backend):
  """Both backends: the plain forms ('xla') and the CPU package's."""
  effdet = import_effdet()
  import torch

  ref = effdet.create_model(
    ref_name,
    pretrained=False,
    pretrained_backbone=False,
    image_size=(size, size),
  )
  ref.eval()
  _randomise(ref, torch, seed=0)
  x = (
    np.random.default_rng(0)
    .standard_normal((1, size, size, 3))
    .astype(np.float32)
  )
  with torch.no_grad():
    ref_cls, ref_box = ref(torch.from_numpy(x).permute(0, 3, 1, 2))
  ref_cls = [t.permute(0, 2, 3, 1).numpy() for t in ref_cls]
  ref_box = [t.permute(0, 2, 3, 1).numpy() for t in ref_box]

  cfg = effdet_jax.model_config(name)
  model = effdet_jax.build_model(cfg)
  abstract = effdet_jax.api.abstract_variables(model)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  variables = effdet_torch.convert_effdet_state_dict(
    state, abstract, model.backbone, model.min_level
  )
  with ops.use_backend(backend):
    cls, box = jax.jit(model.apply)(variables, x)
  assert len(cls) == len(ref_cls) == model.max_level - model.min_level + 1
  for ours, theirs in zip(cls + box, ref_cls + ref_box, strict=True):
    assert ours.shape == theirs.shape
    tol = 1e-4 * max(1.0, float(np.abs(theirs).max()))
    diff = float(np.abs(np.asarray(ours) - theirs).max())
    print(
      f'{name} {theirs.shape} std={theirs.std():.3f} '
      f'max|diff|={diff:.2e} tol={tol:.2e}'
    )
    assert diff <= tol


@pytest.mark.slow
def test_effdet_state_dict_file_through_cli(tmp_path):
  """`python -m effdet_jax.convert --source=effdet` on a saved `.pth`."""
  import subprocess
  import sys

  from conftest import REPO

  effdet = import_effdet()
  import torch

  ref = effdet.create_model(
    'tf_efficientdet_d0',
    pretrained=False,
    pretrained_backbone=False,
    image_size=(128, 128),
  )
  ref.eval()
  _randomise(ref, torch, seed=1)
  torch.save(ref.state_dict(), tmp_path / 'd0.pth')
  subprocess.run(
    [
      sys.executable,
      '-m',
      'effdet_jax.convert',
      '--source=effdet',
      f'--input={tmp_path / "d0.pth"}',
      '--config=configs/d0.py',
      f'--output={tmp_path / "out"}',
    ],
    check=True,
    cwd=REPO,
  )
  model, variables = effdet_jax.load(str(tmp_path / 'out'))
  x = (
    np.random.default_rng(1)
    .standard_normal((1, 128, 128, 3))
    .astype(np.float32)
  )
  with torch.no_grad():
    ref_cls, _ = ref(torch.from_numpy(x).permute(0, 3, 1, 2))
  cls, _ = jax.jit(model.apply)(variables, x)
  theirs = ref_cls[0].permute(0, 2, 3, 1).numpy()
  tol = 1e-4 * max(1.0, float(np.abs(theirs).max()))
  assert float(np.abs(np.asarray(cls[0]) - theirs).max()) <= tol


def test_effdet_lite_checkpoint_rejected_for_d0():
  effdet = import_effdet()
  from effdet_jax.convert import ConversionError

  ref = effdet.create_model(
    'tf_efficientdet_lite0', pretrained=False, pretrained_backbone=False
  )
  model = effdet_jax.build_model(effdet_jax.model_config('efficientdet-d0'))
  abstract = effdet_jax.api.abstract_variables(model)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  # lite has no SE and sum fusion: the error names the missing tensors.
  with pytest.raises(ConversionError, match=r'se\.conv_expand'):
    effdet_torch.convert_effdet_state_dict(
      state, abstract, model.backbone, model.min_level
    )
