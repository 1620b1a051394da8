"""Official EfficientNet / EfficientNet-lite checkpoints -> backbone variables.

The ImageNet checkpoints of google/automl and tensorflow/tpu (EfficientNet
B0-B7, lite0-4, AdvProp, NoisyStudent) use the scopes the EfficientDet
backbone uses (`efficientdet/backbone/efficientnet_model.py: Model`; the
official `--backbone_ckpt`, `efficientdet/det_model_fn.py: _model_fn` with
`efficientdet/utils.py: get_ckpt_var_map`, reads `{backbone}/...` names one
to one), so the backbone part of our tree is read with the `tf_checkpoint`
rename table. The classifier head (`{backbone}/head/...`: conv, BN, dense)
has no place in a detector and is skipped; so are tensors outside the
backbone scope when the source is a whole detector (`outside_scope_ok`).
Everything else is strict.

AdvProp checkpoints were trained on inputs scaled to [-1, 1]
(`x * 2 / 255 - 1`, no mean/std): the official recipe sets
`mean_rgb=0, stddev_rgb=1, scale_range=True`. `ADVPROP_INPUT` holds those
model fields; `python -m effdet_jax.convert --advprop` writes them into the
converted model config, and `init_from` refuses a run whose normalisation
differs from the converted weights'.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from effdet_jax.convert import strict_fill, tf_checkpoint

# Official AdvProp input: image * 2 / 255 - 1 (dataloader `scale_range`).
ADVPROP_INPUT = {
  'mean_rgb': (0.0, 0.0, 0.0),
  'stddev_rgb': (1.0, 1.0, 1.0),
  'scale_range': True,
}
NORMALISATION_FIELDS = tuple(ADVPROP_INPUT)


def backbone_part(tree: Mapping) -> dict:
  """The `backbone` subtree of every collection of a variable tree."""
  return {
    col: {'backbone': sub['backbone']}
    for col, sub in dict(tree).items()
    if 'backbone' in sub
  }


def convert_tf_backbone(
  ckpt_path: str,
  abstract: Mapping,
  backbone_name: str,
  ema: bool = True,
  allow_missing: str = '',
  outside_scope_ok: bool = False,
  with_report: bool = False,
):
  """Backbone-only variables (`{'params': {'backbone': ...}, ...}`).

  Args:
    ckpt_path: official checkpoint folder or prefix.
    abstract: our detector's variables or their shapes (only the backbone
      part is read).
    backbone_name: the checkpoint scope, e.g. 'efficientnet-b0'.
    ema: read the `/ExponentialMovingAverage` shadows (the official
      EfficientNet checkpoints have them); False reads the raw weights.
    allow_missing: regex (re.match) of intended gaps.
    outside_scope_ok: tensors outside `{backbone_name}/` may stay unused
      (a whole-detector checkpoint used as a backbone source).
    with_report: return `(variables, strict_fill.Report)`.
  """
  head = re.compile(re.escape(backbone_name) + r'/head/')
  scope = backbone_name + '/'

  def ignore(name: str) -> bool:
    if head.match(name):  # the ImageNet classifier head
      return True
    return outside_scope_ok and not name.startswith(scope)

  try:
    return tf_checkpoint.convert_tf_checkpoint(
      ckpt_path,
      backbone_part(abstract),
      backbone_name,
      ema=ema,
      allow_missing=allow_missing,
      with_report=with_report,
      ignore=ignore,
    )
  except strict_fill.ConversionError as err:
    import tensorflow as tf

    names = tf.train.load_checkpoint(ckpt_path).get_variable_to_shape_map()
    scopes = sorted({n.split('/')[0] for n in names})
    raise strict_fill.ConversionError(
      f'{err}. Top-level scopes in {ckpt_path}: {strict_fill.preview(scopes)}'
      f'; expected {backbone_name}/ (a whole detector checkpoint converts '
      'with --source=tf, or trains from it with init_from.kind=backbone)'
    ) from None
