"""Parameter counts and FLOPs against `shared/reference/official-counts.json`.

Params must be equal exactly for every named model (the official Keras
trainable count); FLOPs (TF profiler float ops // 2 at image_size) within 2%
for D0-D7x.
"""

import functools

import pytest

from effdet_jax import api, registry
from effdet_jax.tools import summary


@functools.cache
def _summary(name: str) -> dict:
  """summary.summarize of a registered model (traced once per module)."""
  return summary.summarize(api.model_config(name))


@pytest.mark.parametrize('name', registry.model_names())
@pytest.mark.slow
def test_counts_equal_official(name, official_counts):
  ref = official_counts[name]
  s = _summary(name)
  assert s['params'] == ref['params']
  assert s['bn_statistics'] == ref['bn_statistics']
  assert s['params_split'] == ref['params_split']
  assert s['image_size'] == list(ref['image_size'])
  if ref['flops'] is not None:
    assert s['flops'] == pytest.approx(ref['flops'], rel=0.02)


@pytest.mark.slow
def test_paper_table_flops_rounding(official_counts):
  # The paper's FLOPs column (`efficientdet/README.md`, table of section
  # "2. Pretrained EfficientDet Checkpoints"): D0 2.5B ... D7x 410B.
  paper = {
    'efficientdet-d0': 2.5,
    'efficientdet-d4': 55,
    'efficientdet-d7x': 410,
  }
  for name, billions in paper.items():
    flops = _summary(name)['flops'] / 1e9
    assert flops == pytest.approx(billions, rel=0.03)


@pytest.mark.slow
def test_flops_count_sees_through_the_cpu_kernels(official_counts):
  """With the CPU kernels on (one CPU device, as users run), the counted
  FLOPs are still the official ones: the custom calls (depthwise, the
  fused 1x1 conv + BN) hide their arithmetic, so the count traces the jnp
  forms."""
  from effdet_jax.cpu import library as cpu_library

  if not cpu_library.load():
    pytest.skip('no C++ compiler: the kernels are never used')
  want = _summary('efficientdet-d0')['flops']
  with cpu_library.forced(True):
    s = summary.summarize(api.model_config('efficientdet-d0'))
  assert s['flops'] == want
  assert want == pytest.approx(
    official_counts['efficientdet-d0']['flops'], rel=0.02
  )
