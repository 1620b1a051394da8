"""Detection AutoAugment policies v0-v3 and RandAugment.

Official: `efficientdet/aug/autoaugment.py: distort_image_with_autoaugment`
(`policy_v0` ... `policy_v3`, `policy_vtest`, `level_to_arg`) and
`distort_image_with_randaugment`, as called by
`efficientdet/dataloader.py: InputReader.dataset_parser`.

A policy is a list of sub-policies; one sub-policy, drawn uniformly per
image, applies each (op, prob, level) with probability prob. `*_Only_BBoxes`
ops always run and act on each box's pixels with probability prob / 3.
RandAugment (official dataloader: 1 layer, magnitude 15) always applies
one uniformly drawn op. All TF core ops (no tensorflow-addons); all
randomness from the per-example seed.
"""

from __future__ import annotations

import functools

import tensorflow as tf

from effdet_jax.data import augment_ops as ops

MAX_LEVEL = 10.0

# (op, prob, level) per sub-policy, from the official aug/autoaugment.py.
POLICIES = {
  'v0': [
    [('TranslateX_BBox', 0.6, 4), ('Equalize', 0.8, 10)],
    [('TranslateY_Only_BBoxes', 0.2, 2), ('Cutout', 0.8, 8)],
    [('Sharpness', 0.0, 8), ('ShearX_BBox', 0.4, 0)],
    [('ShearY_BBox', 1.0, 2), ('TranslateY_Only_BBoxes', 0.6, 6)],
    [('Rotate_BBox', 0.6, 10), ('Color', 1.0, 6)],
  ],
  'test': [[('TranslateX_BBox', 1.0, 4), ('Equalize', 1.0, 10)]],
}
POLICIES['v1'] = POLICIES['v0'] + [
  [('Color', 0.0, 0), ('ShearX_Only_BBoxes', 0.8, 4)],
  [('ShearY_Only_BBoxes', 0.8, 2), ('Flip_Only_BBoxes', 0.0, 10)],
  [('Equalize', 0.6, 10), ('TranslateX_BBox', 0.2, 2)],
  [('Color', 1.0, 10), ('TranslateY_Only_BBoxes', 0.4, 6)],
  [('Rotate_BBox', 0.8, 10), ('Contrast', 0.0, 10)],
  [('Cutout', 0.2, 2), ('Brightness', 0.8, 10)],
  [('Color', 1.0, 6), ('Equalize', 1.0, 2)],
  [('Cutout_Only_BBoxes', 0.4, 6), ('TranslateY_Only_BBoxes', 0.8, 2)],
  [('Color', 0.2, 8), ('Rotate_BBox', 0.8, 10)],
  [('Sharpness', 0.4, 4), ('TranslateY_Only_BBoxes', 0.0, 4)],
  [('Sharpness', 1.0, 4), ('SolarizeAdd', 0.4, 4)],
  [('Rotate_BBox', 1.0, 8), ('Sharpness', 0.2, 8)],
  [('ShearY_BBox', 0.6, 10), ('Equalize_Only_BBoxes', 0.6, 8)],
  [('ShearX_BBox', 0.2, 6), ('TranslateY_Only_BBoxes', 0.2, 10)],
  [('SolarizeAdd', 0.6, 8), ('Brightness', 0.8, 10)],
]
POLICIES['v2'] = [
  [('Color', 0.0, 6), ('Cutout', 0.6, 8), ('Sharpness', 0.4, 8)],
  [('Rotate_BBox', 0.4, 8), ('Sharpness', 0.4, 2), ('Rotate_BBox', 0.8, 10)],
  [('TranslateY_BBox', 1.0, 8), ('AutoContrast', 0.8, 2)],
  [('AutoContrast', 0.4, 6), ('ShearX_BBox', 0.8, 8), ('Brightness', 0.0, 10)],
  [('SolarizeAdd', 0.2, 6), ('Contrast', 0.0, 10), ('AutoContrast', 0.6, 0)],
  [('Cutout', 0.2, 0), ('Solarize', 0.8, 8), ('Color', 1.0, 4)],
  [('TranslateY_BBox', 0.0, 4), ('Equalize', 0.6, 8), ('Solarize', 0.0, 10)],
  [
    ('TranslateY_BBox', 0.2, 2),
    ('ShearY_BBox', 0.8, 8),
    ('Rotate_BBox', 0.8, 8),
  ],
  [('Cutout', 0.8, 8), ('Brightness', 0.8, 8), ('Cutout', 0.2, 2)],
  [('Color', 0.8, 4), ('TranslateY_BBox', 1.0, 6), ('Rotate_BBox', 0.6, 6)],
  [('Rotate_BBox', 0.6, 10), ('BBox_Cutout', 1.0, 4), ('Cutout', 0.2, 8)],
  [('Rotate_BBox', 0.0, 0), ('Equalize', 0.6, 6), ('ShearY_BBox', 0.6, 8)],
  [('Brightness', 0.8, 8), ('AutoContrast', 0.4, 2), ('Brightness', 0.2, 2)],
  [('TranslateY_BBox', 0.4, 8), ('Solarize', 0.4, 6), ('SolarizeAdd', 0.2, 10)],
  [('Contrast', 1.0, 10), ('SolarizeAdd', 0.2, 8), ('Equalize', 0.2, 4)],
]
POLICIES['v3'] = [
  [('Posterize', 0.8, 2), ('TranslateX_BBox', 1.0, 8)],
  [('BBox_Cutout', 0.2, 10), ('Sharpness', 1.0, 8)],
  [('Rotate_BBox', 0.6, 8), ('Rotate_BBox', 0.8, 10)],
  [('Equalize', 0.8, 10), ('AutoContrast', 0.2, 10)],
  [('SolarizeAdd', 0.2, 2), ('TranslateY_BBox', 0.2, 8)],
  [('Sharpness', 0.0, 2), ('Color', 0.4, 8)],
  [('Equalize', 1.0, 8), ('TranslateY_BBox', 1.0, 8)],
  [('Posterize', 0.6, 2), ('Rotate_BBox', 0.0, 10)],
  [('AutoContrast', 0.6, 0), ('Rotate_BBox', 1.0, 6)],
  [('Equalize', 0.0, 4), ('Cutout', 0.8, 10)],
  [('Brightness', 1.0, 2), ('TranslateY_BBox', 1.0, 6)],
  [('Contrast', 0.0, 2), ('ShearY_BBox', 0.8, 0)],
  [('AutoContrast', 0.8, 10), ('Contrast', 0.2, 10)],
  [('Rotate_BBox', 1.0, 10), ('Cutout', 1.0, 10)],
  [('SolarizeAdd', 0.8, 6), ('Equalize', 0.8, 8)],
]

RANDAUG_OPS = (
  'Equalize',
  'Solarize',
  'Color',
  'Cutout',
  'SolarizeAdd',
  'TranslateX_BBox',
  'TranslateY_BBox',
  'ShearX_BBox',
  'ShearY_BBox',
  'Rotate_BBox',
)
RANDAUG_LAYERS, RANDAUG_MAGNITUDE = 1, 15  # hard-coded in the official loader

# Official augmentation hparams.
CUTOUT_CONST, TRANSLATE_CONST = 100, 250
CUTOUT_BBOX_CONST, TRANSLATE_BBOX_CONST = 50, 120
CUTOUT_MAX_PAD_FRACTION = 0.75


def _signed(value: float, seed) -> tf.Tensor:
  """value with a random sign (p = 0.5)."""
  positive = tf.random.stateless_uniform([], seed) < 0.5
  return tf.where(positive, value, -value)


def _enhance(level):
  return level / MAX_LEVEL * 1.8 + 0.1


def _image_op(name: str, level: float):
  """fn(image, seed) for the ops that ignore boxes, or None."""
  f = level / MAX_LEVEL
  table = {
    'AutoContrast': lambda im, s: ops.autocontrast(im),
    'Equalize': lambda im, s: ops.equalize(im),
    'Posterize': lambda im, s: ops.posterize(im, int(f * 4)),
    'Solarize': lambda im, s: ops.solarize(im, int(f * 256)),
    'SolarizeAdd': lambda im, s: ops.solarize_add(im, int(f * 110)),
    'Color': lambda im, s: ops.color(im, _enhance(level)),
    'Contrast': lambda im, s: ops.contrast(im, _enhance(level)),
    'Brightness': lambda im, s: ops.brightness(im, _enhance(level)),
    'Sharpness': lambda im, s: ops.sharpness(im, _enhance(level)),
    'Cutout': lambda im, s: ops.cutout(im, s, int(f * CUTOUT_CONST)),
  }
  return table.get(name)


def _crop_op(name: str, level: float):
  """fn(crop, seed) applied inside boxes by the *_Only_BBoxes ops."""
  f = level / MAX_LEVEL
  shift = f * TRANSLATE_BBOX_CONST
  table = {
    'Rotate': lambda im, s: ops.rotate(im, _signed(f * 30.0, s)),
    'ShearX': lambda im, s: ops.shear(im, _signed(f * 0.3, s), True),
    'ShearY': lambda im, s: ops.shear(im, _signed(f * 0.3, s), False),
    'TranslateX': lambda im, s: ops.translate(im, _signed(shift, s), True),
    'TranslateY': lambda im, s: ops.translate(im, _signed(shift, s), False),
    'Flip': lambda im, s: tf.image.flip_left_right(im),
    'Solarize': lambda im, s: ops.solarize(im, int(f * 256)),
    'Equalize': lambda im, s: ops.equalize(im),
    'Cutout': lambda im, s: ops.cutout(im, s, int(f * CUTOUT_BBOX_CONST)),
  }
  return table[name]


def _box_op(name: str, level: float):
  """fn(image, boxes, seed) -> (image, boxes) for ops that see boxes."""
  f = level / MAX_LEVEL
  shift = f * TRANSLATE_CONST
  table = {
    'Rotate_BBox': lambda im, b, s: ops.rotate_with_boxes(
      im, b, _signed(f * 30.0, s)
    ),
    'ShearX_BBox': lambda im, b, s: ops.shear_with_boxes(
      im, b, _signed(f * 0.3, s), True
    ),
    'ShearY_BBox': lambda im, b, s: ops.shear_with_boxes(
      im, b, _signed(f * 0.3, s), False
    ),
    'TranslateX_BBox': lambda im, b, s: ops.translate_with_boxes(
      im, b, _signed(shift, s), True
    ),
    'TranslateY_BBox': lambda im, b, s: ops.translate_with_boxes(
      im, b, _signed(shift, s), False
    ),
    'BBox_Cutout': lambda im, b, s: ops.bbox_cutout(
      im, b, s, f * CUTOUT_MAX_PAD_FRACTION
    ),
  }
  return table.get(name)


def op_names() -> list[str]:
  """Every op name the policies and RandAugment use (and a few more)."""
  crop = ['Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Flip']
  crop += ['Solarize', 'Equalize', 'Cutout']
  return sorted(
    [
      'AutoContrast',
      'Equalize',
      'Posterize',
      'Solarize',
      'SolarizeAdd',
      'Color',
      'Contrast',
      'Brightness',
      'Sharpness',
      'Cutout',
      'Rotate_BBox',
      'ShearX_BBox',
      'ShearY_BBox',
      'TranslateX_BBox',
      'TranslateY_BBox',
      'BBox_Cutout',
    ]
    + [c + '_Only_BBoxes' for c in crop]
  )


def make_op(name: str, prob: float, level: float):
  """fn(image, boxes, seed) -> (image, boxes): op `name` at `level`, run
  with probability `prob` (bbox-only ops: prob / 3 per box)."""
  if name.endswith('_Only_BBoxes'):
    crop = _crop_op(name[: -len('_Only_BBoxes')], level)
    return functools.partial(ops.only_bboxes, prob=prob, fn=crop)
  image_fn = _image_op(name, level)
  box_fn = _box_op(name, level)
  if image_fn is None and box_fn is None:
    raise ValueError(f'unknown augmentation op {name!r}')
  if box_fn is None:
    box_fn = lambda im, b, s: (image_fn(im, s), b)  # noqa: E731

  def run(image, boxes, seed):
    if prob <= 0.0:
      return image, boxes
    if prob >= 1.0:
      return box_fn(image, boxes, seed)
    seeds = tf.random.split(seed, 2)
    apply = tf.random.stateless_uniform([], seeds[0]) < prob
    return tf.cond(
      apply, lambda: box_fn(image, boxes, seeds[1]), lambda: (image, boxes)
    )

  return run


def _sub_policy(spec):
  fns = [make_op(*op) for op in spec]

  def run(image, boxes, seed):
    for j, fn in enumerate(fns):
      image, boxes = fn(
        image, boxes, tf.random.experimental.stateless_fold_in(seed, j)
      )
    return image, boxes

  return run


def distort(
  image: tf.Tensor, boxes: tf.Tensor, policy: str, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
  """Applies `policy` ('v0'..'v3', 'test', 'randaug') to a uint8 image and
  its normalised yxyx boxes."""
  seeds = tf.random.split(seed, 2)
  if policy == 'randaug':
    branches = [
      _sub_policy([(name, 1.0, RANDAUG_MAGNITUDE)]) for name in RANDAUG_OPS
    ]
  elif policy in POLICIES:
    branches = [_sub_policy(spec) for spec in POLICIES[policy]]
  else:
    raise ValueError(
      f'unknown autoaugment_policy {policy!r}; valid: '
      f'{sorted(POLICIES) + ["randaug"]}'
    )
  pick = tf.random.stateless_uniform([], seeds[0], 0, len(branches), tf.int32)
  image, boxes = tf.switch_case(
    pick, [functools.partial(b, image, boxes, seeds[1]) for b in branches]
  )
  image = tf.ensure_shape(image, [None, None, 3])
  return image, tf.ensure_shape(boxes, [None, 4])
