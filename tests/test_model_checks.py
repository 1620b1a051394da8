"""A model section that is not what it says stops a run at start-up, before
anything is compiled: a `model.name` overridden on another model's config,
an image size the network cannot take, a bad saved `model_config.json`."""

import json

import pytest
from absl import flags
from conftest import REPO
from ml_collections import config_flags

from effdet_jax import api, config_files, model_checks
from effdet_jax.data import dataset_checks, testing
from effdet_jax.detection import anchors as anchors_lib

CONFIG_SPECS = sorted(
  p.name
  for p in (REPO / 'configs').glob('*.py')
  if p.name not in ('__init__.py', 'base.py')
) + ['demo.py:test', 'custom.py:bccd,runlocal']


@pytest.mark.parametrize('spec', CONFIG_SPECS)
def test_every_config_passes(spec):
  model = config_files.load(spec).model
  size = model.image_size
  model_checks.check(model)
  assert model.image_size == size  # nothing to normalise


def _command_line(*overrides):
  """The run config as `python -m effdet_jax.main` parses it."""
  argv = ['prog', f'--config={REPO / "configs" / "d0.py"}', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    'config', None, '', fv, lock_config=True, sys_argv=argv
  )
  fv(argv)
  return fv.config


def test_name_overridden_on_another_models_config_is_rejected():
  config = _command_line('--config.model.name=efficientdet-d3')
  assert config.model.backbone_name == 'efficientnet-b0'  # still D0
  with pytest.raises(ValueError, match='--config=configs/d3.py') as err:
    model_checks.check(config.model)
  assert "model.name='efficientdet-d3'" in str(err.value)
  assert "'efficientnet-b3'" in str(err.value)


def test_same_backbone_or_unregistered_name_passes():
  # d7 is d6's backbone with other fields; an unregistered name is a label.
  for name in ('efficientdet-d6', 'my-cells-detector'):
    config = config_files.load('d7')
    config.model.name = name
    model_checks.check(config.model)


def test_startup_checks_of_training_and_eval_run_it_first(tmp_path):
  """dataset_checks.verify is the start-up of the trainer
  (prepare_training) and of the Evaluator (train_and_eval and --mode=eval):
  it stops there, before the model is even built."""
  from effdet_jax.evaluation import runner
  from effdet_jax.train import trainer

  config = testing.small_config(source='synthetic', label_map='shapes')
  config.model.num_classes = 3
  config.model.name = 'efficientdet-d3'
  with pytest.raises(ValueError, match='configs/d3.py'):
    dataset_checks.verify(config, None, ('train',))
  with pytest.raises(ValueError, match='configs/d3.py'):
    runner.Evaluator(config, str(tmp_path))
  with pytest.raises(ValueError, match='configs/d3.py'):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'config.json').exists()  # stopped before anything


def test_scalar_image_size_from_the_command_line_becomes_a_pair():
  config = _command_line('--config.model.image_size=512')
  assert config.model.image_size == (512,)  # what config_flags gives
  model_checks.check(config.model)
  assert config.model.image_size == (512, 512)
  # Consumers now take it; (512,) failed to unpack.
  assert anchors_lib.anchors_from_config(config.model).shape == (49104, 4)
  model = dict(api.model_config('efficientdet-d0'), image_size=256)
  model_checks.check(model)  # an int is (n, n) for every consumer
  assert model['image_size'] == 256


@pytest.mark.parametrize(
  'size, needle',
  [
    ((32, 32), '2**max_level = 128'),
    ((512, 64), '2**max_level = 128'),
    ((0, 0), 'positive integers'),
    ((512, 512, 3), 'must be (H, W)'),
    ('640x384', 'must be (H, W)'),
    ((512.0, 512.0), 'must be (H, W)'),
  ],
)
def test_bad_image_size_is_rejected(size, needle):
  model = dict(api.model_config('efficientdet-d0'), image_size=size)
  with pytest.raises(ValueError) as err:
    model_checks.check(model)
  assert needle in str(err.value)


def test_too_small_image_size_stops_at_startup():
  config = _command_line('--config.model.image_size=(32, 32)')
  with pytest.raises(ValueError, match=r'at least \(128, 128\)'):
    dataset_checks.verify(config, None, ())
  config.model.max_level = 5  # a smaller network takes it
  model_checks.check(config.model)


def _saved(tmp_path, text):
  path = tmp_path / api.MODEL_CONFIG_FILE
  path.write_text(text)
  return path


def test_read_model_config_round_trip(tmp_path):
  cfg = api.model_config('efficientdet-d0', num_classes=3)
  path = _saved(tmp_path, json.dumps(cfg.to_dict()))
  got = model_checks.read_model_config(path)
  assert got == cfg.to_dict()
  assert got['image_size'] == (512, 512)  # json lists back to tuples
  # An older file without the optional fields still reads.
  old = {k: v for k, v in cfg.items() if k not in model_checks.OPTIONAL_FIELDS}
  model_checks.read_model_config(_saved(tmp_path, json.dumps(old)))


def test_bad_model_config_names_the_file_and_the_cause(tmp_path):
  cfg = api.model_config('efficientdet-d0').to_dict()
  text = json.dumps(cfg)
  cases = [
    (text[:-20], 'is not valid JSON'),
    ('[1, 2]', 'holds a JSON list'),
    (
      json.dumps({k: v for k, v in cfg.items() if k != 'max_level'}),
      'max_level',
    ),
    (json.dumps(dict(cfg, num_clases=3)), "unknown fields ['num_clases']"),
  ]
  for content, needle in cases:
    path = _saved(tmp_path, content)
    with pytest.raises(ValueError) as err:
      model_checks.read_model_config(path)
    assert str(path) in str(err.value), str(err.value)
    assert needle in str(err.value), str(err.value)


def test_init_from_reports_a_bad_model_config(tmp_path):
  from effdet_jax.train import init_from

  _saved(tmp_path, '{"backbone_name": "efficientnet-b0",')
  with pytest.raises(ValueError, match='is not valid JSON') as err:
    init_from._our_tree(str(tmp_path), 'converted', True)
  assert str(tmp_path / api.MODEL_CONFIG_FILE) in str(err.value)
