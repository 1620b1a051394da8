"""Test-only loader for the PyTorch reference package `effdet` (0.4.1).

PyPI's torchvision does not load its compiled ops beside the CPU build of
torch 2.13.0 ("operator torchvision::nms does not exist"), and importing
torchvision then fails in its fake-kernel registrations. effdet's network uses
no torchvision op; only its box utilities call `nms`. We declare the two ops
torchvision registers fake kernels for and give `nms` a plain CPU kernel, so
`import effdet` works with the small CPU torch. This lives in tests only.
"""

import importlib

_REGISTERED = []


def _nms_cpu(dets, scores, iou_threshold):
  import torch

  order = torch.argsort(scores, descending=True)
  keep = []
  suppressed = torch.zeros(dets.shape[0], dtype=torch.bool)
  x1, y1, x2, y2 = dets.unbind(1)
  areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
  for i in order.tolist():
    if suppressed[i]:
      continue
    keep.append(i)
    w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
    h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
    inter = w * h
    iou = inter / (areas[i] + areas - inter)
    suppressed |= iou > iou_threshold
  return torch.tensor(keep, dtype=torch.long)


def import_effdet():
  """Imports and returns the `effdet` module (skips the test if absent)."""
  import pytest

  torch = pytest.importorskip('torch')
  if not _REGISTERED:
    try:
      import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001
      import sys

      for name in [m for m in sys.modules if m.startswith('torchvision')]:
        del sys.modules[name]
      lib = torch.library.Library('torchvision', 'DEF')
      schema = '(Tensor dets, Tensor scores, float iou_threshold) -> Tensor'
      lib.define('nms' + schema)
      lib.define('qnms' + schema)
      lib.impl('nms', _nms_cpu, 'CPU')
      _REGISTERED.append(lib)
    else:
      _REGISTERED.append(None)
  return importlib.import_module('effdet')
