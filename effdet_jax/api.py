"""Public entry points: build a model from a config, create or load one."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from effdet_jax import files, initialization, model_checks, registry
from effdet_jax.models import efficientnet
from effdet_jax.models.efficientdet import EfficientDet

# Compute dtypes by name (parameters and BN statistics stay float32).
DTYPES = {
  'float32': jnp.float32,
  'bfloat16': jnp.bfloat16,
  'float16': jnp.float16,
}

MODEL_CONFIG_FILE = 'model_config.json'
VARIABLES_DIR = 'variables'


def model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The `model` config section of a named model, with overrides applied.

  Holds the official hyper-parameters (registry) plus our knobs: head and
  backbone drop-connect and the compute dtype. `depthwise_impl` is
  deprecated: accepted and ignored (the backend switch, `effdet_jax.ops`,
  chooses how layers are computed).
  Raises ValueError for an unknown model name or an unknown field.
  """
  cfg = ml_collections.ConfigDict(registry.get_model_params(name))
  # Head drop-connect (official hparam `survival_prob`, default None = off).
  cfg.survival_prob = config_dict.placeholder(float)
  # Backbone drop-connect base survival; None = official (0 for b0, else 0.8).
  cfg.backbone_survival_prob = config_dict.placeholder(float)
  cfg.dtype = 'float32'  # compute dtype: float32 | bfloat16
  cfg.depthwise_impl = 'auto'  # deprecated, ignored: see effdet_jax.ops
  for key, value in overrides.items():
    if key not in cfg:
      raise ValueError(
        f'unknown model field {key!r}; valid fields: {sorted(cfg)}'
      )
    cfg[key] = value
  return cfg


class ModelAndVariables(tuple):
  """`(model, variables)` that also carries its `model` config section.

  Unpacks like the plain pair (`model, variables = effdet_jax.load(p)`);
  `effdet_jax.predict` reads `.config` (image size, normalisation, anchors).
  """

  def __new__(cls, model: Any, variables: Any, config: Any):
    pair = super().__new__(cls, (model, variables))
    pair.config = ml_collections.ConfigDict(dict(config))
    return pair


def _warn_deprecated(cfg: Mapping[str, Any]) -> None:
  impl = cfg.get('depthwise_impl', 'auto')
  if impl not in (None, 'auto'):
    warnings.warn(
      f'model.depthwise_impl={impl!r} is deprecated and ignored: the backend'
      ' switch chooses how layers are computed (--backend=xla|cpu, '
      '$EFFDET_JAX_BACKEND or effdet_jax.ops.set_backend)',
      DeprecationWarning,
      stacklevel=3,
    )


def build_model(
  cfg: Mapping[str, Any],
  remat: bool = False,
  remat_policy: str = 'nothing_saveable',
) -> EfficientDet:
  """EfficientDet from a `model` config section (ConfigDict or dict).

  `remat` recomputes backbone blocks and BiFPN cells in the backward pass
  (the run config's `train.remat`), keeping what `remat_policy` (a
  `jax.checkpoint_policies` name, `train.remat_policy`) saves; neither
  changes the function.
  """
  cfg = dict(cfg)
  _warn_deprecated(cfg)
  dtype = cfg.get('dtype', 'float32')
  if dtype not in DTYPES:
    raise ValueError(f'unknown dtype {dtype!r}; valid: {sorted(DTYPES)}')
  spec = efficientnet.backbone_spec(
    cfg['backbone_name'], cfg.get('backbone_survival_prob')
  )
  return EfficientDet(
    backbone=spec,
    num_classes=int(cfg['num_classes']),
    num_anchors=int(cfg['num_scales']) * len(cfg['aspect_ratios']),
    min_level=int(cfg['min_level']),
    max_level=int(cfg['max_level']),
    fpn_num_filters=int(cfg['fpn_num_filters']),
    fpn_cell_repeats=int(cfg['fpn_cell_repeats']),
    box_class_repeats=int(cfg['box_class_repeats']),
    fpn_weight_method=cfg['fpn_weight_method'],
    act_type=cfg['act_type'],
    separable_conv=bool(cfg['separable_conv']),
    apply_bn_for_resampling=bool(cfg['apply_bn_for_resampling']),
    conv_after_downsample=bool(cfg['conv_after_downsample']),
    conv_bn_act_pattern=bool(cfg['conv_bn_act_pattern']),
    head_survival_prob=cfg.get('survival_prob'),
    dtype=DTYPES[dtype],
    remat=remat,
    remat_policy=remat_policy,
  )


def _model_section(
  name_or_config: Any, overrides: dict
) -> ml_collections.ConfigDict:
  if isinstance(name_or_config, str):
    return model_config(name_or_config, **overrides)
  cfg = name_or_config
  if 'model' in cfg:  # a full run config
    cfg = cfg['model']
  cfg = ml_collections.ConfigDict(dict(cfg))
  for key, value in overrides.items():
    if key not in cfg:
      raise ValueError(f'unknown model field {key!r}; valid: {sorted(cfg)}')
    cfg[key] = value
  return cfg


def init_variables(model: EfficientDet, rng: jax.Array | None = None) -> dict:
  """Fresh variables ({'params', 'batch_stats'}) on the default device.

  Drawn on the host from `rng` (a JAX key; default seed 0), no compiled
  program: see `effdet_jax.initialization`. Under a JAX transformation
  with a traced key, `model.init` itself.
  """
  if isinstance(rng, jax.core.Tracer):
    return initialization.init(model, rng)
  host = initialization.host_variables(model, 0 if rng is None else rng)
  return initialization.to_device(host)


def abstract_variables(model: EfficientDet) -> dict:
  """The variables' structure (`jax.ShapeDtypeStruct` leaves), no values."""
  return initialization.abstract_variables(model)


def create_model(
  name_or_config: Any, rng: jax.Array | None = None, **overrides: Any
) -> ModelAndVariables:
  """`(model, variables)` with freshly initialised variables.

  Args:
    name_or_config: a registry name ('efficientdet-d0', ...), a `model`
      config section, or a full run config with a `model` section.
    rng: PRNG key for the initialisers (default PRNGKey(0)).
    **overrides: model fields, e.g. `num_classes=3`, `dtype='bfloat16'`.
  """
  cfg = _model_section(name_or_config, overrides)
  model = build_model(cfg)
  return ModelAndVariables(model, init_variables(model, rng), cfg)


def save(path: str, model_cfg: Mapping[str, Any], variables: dict) -> None:
  """Writes `model_config.json` and an orbax checkpoint of the variables
  (`path`: a local folder or a URL, e.g. gs://bucket/model)."""
  import orbax.checkpoint as ocp

  from effdet_jax.runtime import checkpoint  # noqa: PLC0415

  files.makedirs(path)
  cfg = ml_collections.ConfigDict(dict(model_cfg)).to_dict()
  files.write_json(
    files.join(path, MODEL_CONFIG_FILE), cfg, indent=2, sort_keys=True
  )
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(checkpoint.saved_variables_dir(path), variables, force=True)
    ckptr.wait_until_finished()


def load(path: str, dtype: str | None = None) -> ModelAndVariables:
  """`(model, variables)` from a converter/`save` directory or a workdir.

  For a training workdir the latest checkpoint's EMA variables are used.
  The model computes in `dtype` ('float32' | 'bfloat16' | 'float16') when
  given, else in the saved config's `dtype` (float32 for a converted
  checkpoint unless it was converted with `--dtype`; a training workdir's
  recipe, e.g. bfloat16 for D6-D7x). The variables are the same either way
  (float32); `.config.dtype` says what the model computes in. `path` is a
  local folder or a URL (gs://...).
  """
  from effdet_jax.runtime import checkpoint  # noqa: PLC0415 - imports orbax

  path = files.absolute(path)
  cfg_file = files.join(path, MODEL_CONFIG_FILE)
  if not files.exists(cfg_file):
    raise FileNotFoundError(
      f'{path} has no {MODEL_CONFIG_FILE}; expected a directory written by '
      '`python -m effdet_jax.convert` or effdet_jax.api.save'
    )
  cfg = model_checks.read_model_config(cfg_file)
  if dtype is not None:
    if dtype not in DTYPES:
      raise ValueError(f'unknown dtype {dtype!r}; valid: {sorted(DTYPES)}')
    cfg['dtype'] = dtype
  for key in ('image_size', 'aspect_ratios', 'mean_rgb', 'stddev_rgb'):
    if isinstance(cfg.get(key), list):
      cfg[key] = tuple(cfg[key])
  model = build_model(cfg)
  abstract = abstract_variables(model)
  # A training workdir's newest readable EMA variables, or what save wrote.
  _, out = checkpoint.restore_read_only(path, {'variables': abstract})
  return ModelAndVariables(model, out['variables'], cfg)
