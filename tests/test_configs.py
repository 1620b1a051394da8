"""Every config file builds; overrides work; typos and bad names fail loudly."""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO

from effdet_jax import api, config_files, registry

CONFIG_FILES = sorted(
  p.name
  for p in (REPO / 'configs').glob('*.py')
  if p.name not in ('__init__.py', 'base.py')
)

# Finetune recipes and the model fields they set themselves (the rest must
# stay the official model's).
RECIPES = {
  'custom.py': {'num_classes', 'image_size'},
  'voc_finetune.py': {'num_classes', 'image_size'},
  'bccd_lite0.py': {'num_classes', 'image_size', 'anchor_scale'},
}


def _load(name):
  spec = importlib.util.spec_from_file_location(
    name[:-3], REPO / 'configs' / name
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def test_one_config_per_model():
  expected = {
    n.removeprefix('efficientdet-') + '.py' for n in registry.model_names()
  }
  assert expected <= set(CONFIG_FILES)


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_config_builds_model(name):
  cfg = _load(name)
  for section in ('model', 'data', 'train', 'eval', 'mesh', 'checkpoint'):
    assert section in cfg
  if name != 'demo.py':  # the demo is a small variant on purpose
    official = registry.get_model_params(cfg.model.name)
    # Finetune recipes set their classes (custom: also the input size).
    own = RECIPES.get(name, set())
    for key, value in official.items():
      if key not in own:
        assert cfg.model[key] == value, key
  model = api.build_model(cfg.model)
  assert model.num_anchors == 9


def test_registry_facts():
  d7 = registry.get_model_params('efficientdet-d7')
  assert d7['backbone_name'] == 'efficientnet-b6' and d7['anchor_scale'] == 5.0
  d7x = registry.get_model_params('efficientdet-d7x')
  assert d7x['max_level'] == 8 and d7x['fpn_weight_method'] == 'sum'
  lite3 = registry.get_model_params('efficientdet-lite3')
  assert lite3['anchor_scale'] == 4.0 and lite3['act_type'] == 'relu6'
  assert lite3['mean_rgb'] == (127.0, 127.0, 127.0)
  assert registry.parse_image_size('640x384') == (384, 640)  # 'WxH'


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match='efficientdet-lite3x'):
    api.model_config('efficientdet-d9')


def _summary(*flags):
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'effdet_jax.tools.summary',
      '--config=configs/d0.py',
      *flags,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
  )


@pytest.mark.slow
def test_command_line_override_and_typo():
  ok = _summary('--config.model.num_classes=3', '--format=json')
  assert ok.returncode == 0, ok.stderr
  s = json.loads(ok.stdout.strip().splitlines()[-1])
  assert s['params_split']['class_net'] == 69354 - (810 - 27) * 64 - (810 - 27)
  bad = _summary('--config.model.num_clases=3')
  assert bad.returncode != 0
  assert 'num_clases' in bad.stderr


# The arguments each config's get_config accepts (`--config=FILE:ARG`).
CONFIG_ARGS = {
  'demo.py': ('test',),
  'custom.py': ('bccd', 'runlocal'),
  'bccd_lite0.py': ('lite1', 'lite2', 'scratch'),
}


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_config_argument_typo_fails(name):
  accepted = CONFIG_ARGS.get(name, ())
  with pytest.raises(
    ValueError, match=f"unknown argument 'tset': config {name}"
  ):
    config_files.load(f'{name}:tset')
  for word in accepted:
    with pytest.raises(ValueError, match=repr(word)):  # listed in the message
      config_files.load(f'{name}:tset')
  if not accepted:
    with pytest.raises(ValueError, match='takes no argument'):
      config_files.load(f'{name}:tset')
  # What it accepts still works, alone and together; '' is no argument.
  config_files.load(f'{name}:')
  for arg in (*accepted, ','.join(accepted)):
    if arg:
      config_files.load(f'{name}:{arg}')


def test_config_argument_changes_the_config():
  assert config_files.load('demo:test').train.num_steps == 6
  assert config_files.load('demo').train.num_steps == 420
  assert config_files.load('custom:bccd,runlocal').train.num_steps == 20
