"""Class names by 1-based class id, the ids the batches carry.

Batches carry the class labels of the official TFRecords, so one batch
layout serves every dataset and the target assigner subtracts 1 as the
official one does.

COCO keeps its category ids 1..90 (80 used); VOC uses the official
`create_pascal_tfrecord` order 1..20; the synthetic shapes use 1..3(+).
"""

from __future__ import annotations

import dataclasses
import os

from effdet_jax import files

COCO = {
  1: 'person',
  2: 'bicycle',
  3: 'car',
  4: 'motorcycle',
  5: 'airplane',
  6: 'bus',
  7: 'train',
  8: 'truck',
  9: 'boat',
  10: 'traffic light',
  11: 'fire hydrant',
  13: 'stop sign',
  14: 'parking meter',
  15: 'bench',
  16: 'bird',
  17: 'cat',
  18: 'dog',
  19: 'horse',
  20: 'sheep',
  21: 'cow',
  22: 'elephant',
  23: 'bear',
  24: 'zebra',
  25: 'giraffe',
  27: 'backpack',
  28: 'umbrella',
  31: 'handbag',
  32: 'tie',
  33: 'suitcase',
  34: 'frisbee',
  35: 'skis',
  36: 'snowboard',
  37: 'sports ball',
  38: 'kite',
  39: 'baseball bat',
  40: 'baseball glove',
  41: 'skateboard',
  42: 'surfboard',
  43: 'tennis racket',
  44: 'bottle',
  46: 'wine glass',
  47: 'cup',
  48: 'fork',
  49: 'knife',
  50: 'spoon',
  51: 'bowl',
  52: 'banana',
  53: 'apple',
  54: 'sandwich',
  55: 'orange',
  56: 'broccoli',
  57: 'carrot',
  58: 'hot dog',
  59: 'pizza',
  60: 'donut',
  61: 'cake',
  62: 'chair',
  63: 'couch',
  64: 'potted plant',
  65: 'bed',
  67: 'dining table',
  70: 'toilet',
  72: 'tv',
  73: 'laptop',
  74: 'mouse',
  75: 'remote',
  76: 'keyboard',
  77: 'cell phone',
  78: 'microwave',
  79: 'oven',
  80: 'toaster',
  81: 'sink',
  82: 'refrigerator',
  84: 'book',
  85: 'clock',
  86: 'vase',
  87: 'scissors',
  88: 'teddy bear',
  89: 'hair drier',
  90: 'toothbrush',
}

VOC = {
  i + 1: name
  for i, name in enumerate(
    (
      'aeroplane bicycle bird boat bottle bus car cat chair cow '
      'diningtable dog horse motorbike person pottedplant sheep sofa '
      'train tvmonitor'
    ).split()
  )
}

# The synthetic dataset's class of each shape kind (see synthetic.py).
SHAPES = {1: 'rectangle', 2: 'ellipse', 3: 'triangle', 4: 'cross'}

# TFDS `coco/2017` numbers the 80 used categories 0..79 in id order.
COCO_CONTIGUOUS_TO_ID = tuple(sorted(COCO))

_NAMED = {'coco': COCO, 'voc': VOC, 'shapes': SHAPES}


def load(spec: str | dict | None) -> dict[int, str]:
  """A label map {id: name} from a name, a json path or a dict.

  A json file may map id -> name (ours, written by create_tfrecord) or
  name -> id (the official `label_map_json_path` layout); both are read.
  """
  if not spec:
    return {}
  if isinstance(spec, dict):
    return _normalise(spec)
  if spec in _NAMED:
    return dict(_NAMED[spec])
  if not files.exists(spec):
    raise ValueError(
      f'label map {spec!r} is neither one of {sorted(_NAMED)} nor a file'
    )
  return _normalise(files.read_json(spec))


def _normalise(raw: dict) -> dict[int, str]:
  out = {}
  for key, value in raw.items():
    if isinstance(value, dict):  # a workdir label_map.json (ClassMap)
      value = value['name']
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
      key, value = value, key  # name -> id
    out[int(key)] = str(value)
  out.pop(0, None)  # an official VOC map lists 'background': 0
  return out


def save(path: str, label_map: dict[int, str]) -> None:
  """Writes {id: name} as json, ids sorted."""
  files.write_json(
    path, {str(k): label_map[k] for k in sorted(label_map)}, indent=1
  )


# The label map a training run saves beside its checkpoints.
WORKDIR_FILE = 'label_map.json'


def records_file(prefix: str) -> str:
  """Where create_tfrecord writes the label map of PREFIX-*.tfrecord:
  DIR/label_map.BASE.json for PREFIX = DIR/BASE. The name does not start
  with BASE, so the official shard glob (`--validation_file_pattern=
  DIR/val*`) matches only the records."""
  directory, base = os.path.split(prefix)  # a string split: URLs too
  return files.join(directory, f'label_map.{base}.json')


def records_files(prefix: str) -> tuple[str, str]:
  """`records_file(prefix)`, then the name records written before it used
  (PREFIX_label_map.json, which the official `PREFIX*` glob matched): the
  names to look for, in order."""
  return records_file(prefix), prefix + '_label_map.json'


@dataclasses.dataclass(frozen=True)
class ClassMap:
  """The classes of a run: the model's 1-based class id -> name, and ->
  the dataset's category id (the id written into COCO results). Identity
  category ids unless `data.category_ids='contiguous'`."""

  names: dict[int, str]
  category_ids: dict[int, int]

  @classmethod
  def identity(cls, names: dict[int, str]) -> ClassMap:
    return cls(dict(names), {k: k for k in names})

  @property
  def is_identity(self) -> bool:
    return all(k == v for k, v in self.category_ids.items())

  @property
  def category_to_class(self) -> dict[int, int]:
    return {v: k for k, v in self.category_ids.items()}

  def for_model(self, num_classes: int) -> ClassMap:
    """The classes a model with `num_classes` outputs predicts: ids
    1..num_classes. A named map may list more (`shapes` has 4 for a
    3-class demo); evaluation and drawing must not show those."""
    keep = [k for k in self.names if 1 <= k <= num_classes]
    return ClassMap(
      {k: self.names[k] for k in keep},
      {k: self.category_ids[k] for k in keep},
    )

  def to_json(self) -> dict[str, dict]:
    return {
      str(k): {'name': self.names[k], 'category_id': self.category_ids[k]}
      for k in sorted(self.names)
    }

  @classmethod
  def from_json(cls, raw: dict) -> ClassMap:
    names, ids = {}, {}
    for key, value in raw.items():
      if isinstance(value, dict):
        names[int(key)] = str(value['name'])
        ids[int(key)] = int(value.get('category_id', key))
      else:  # a plain {id: name} map
        names[int(key)] = str(value)
        ids[int(key)] = int(key)
    return cls(names, ids)

  def differences(self, other: ClassMap) -> list[str]:
    """Human-readable lines where `other` differs from this map."""
    out = []
    for k in sorted(set(self.names) | set(other.names)):
      mine = (self.names.get(k), self.category_ids.get(k))
      theirs = (other.names.get(k), other.category_ids.get(k))
      if mine != theirs:
        out.append(
          f'class {k}: {_describe(*mine)} here vs {_describe(*theirs)}'
        )
    return out


def _describe(name: str | None, category_id: int | None) -> str:
  if name is None:
    return 'absent'
  return f'{name!r} (category id {category_id})'


def save_workdir(workdir: str, class_map: ClassMap) -> str:
  """Writes `workdir/label_map.json` (a local path or gs://)."""
  path = files.join(workdir, WORKDIR_FILE)
  # Other processes read it at the same time (`load_workdir`): never half.
  files.write_json(path, class_map.to_json(), indent=1)
  return path


def load_workdir(workdir: str) -> ClassMap | None:
  """The ClassMap saved in a workdir, or None when there is none."""
  path = files.join(workdir, WORKDIR_FILE)
  if not files.exists(path):
    return None
  return ClassMap.from_json(files.read_json(path))
