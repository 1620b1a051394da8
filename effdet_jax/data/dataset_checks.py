"""Start-up checks: the dataset against the run config, before any compile.

checks.py counts and skips *one* bad record while a run goes on. The
mistakes here are different: each makes the whole run worthless (it "trains
fine" and evaluates to 0 or -1 AP), so the run stops at start-up with a
message that names the problem, a few examples and the fix:

* a category id the model cannot predict: not in the label map, or its
  class id (after `data.category_ids`) outside 1..model.num_classes;
* duplicate image ids or annotation ids (COCOeval silently merges them);
* annotations of image ids the json does not list;
* boxes outside their image (checks.py's tolerance), images without a
  positive width/height;
* image files that do not exist;
* a label map that differs from the one saved in the workdir (resuming or
  evaluating a checkpoint trained on other classes);
* a model section that is not what it says (`effdet_jax/model_checks.py`:
  `model.name` overridden on another model's config file, an image size
  the network cannot take).

Zero-size boxes are counted, not fatal: the pipeline drops them (BCCD has
two). A coco_json source is checked in full (one directory listing per
image folder, no image is decoded); a tfrecord source by the label map
written beside its records; synthetic and tfds data by their label maps.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any

import numpy as np

from effdet_jax import files, model_checks
from effdet_jax.data import checks, label_maps, sources

_SHOW = 5  # examples named per problem


class DatasetError(ValueError):
  """The dataset does not fit the config; the message says how."""


@dataclasses.dataclass
class Report:
  """What a check saw in one split."""

  split: str
  num_images: int = 0
  num_boxes: int = 0
  class_counts: dict[int, int] = dataclasses.field(default_factory=dict)
  zero_area_boxes: int = 0
  crowd_boxes: int = 0
  images_without_boxes: int = 0

  def summary(self, class_map: label_maps.ClassMap) -> str:
    counts = ', '.join(
      f'{class_map.names.get(k, "?")}={v}'
      for k, v in sorted(self.class_counts.items())
    )
    return (
      f'{self.split}: {self.num_images} images, {self.num_boxes} boxes '
      f'({counts}); {self.zero_area_boxes} zero-size (dropped), '
      f'{self.crowd_boxes} crowd, {self.images_without_boxes} images '
      'without boxes'
    )


def _examples(values: list, show: int = _SHOW) -> str:
  values = list(values)
  more = f' (+{len(values) - show} more)' if len(values) > show else ''
  return ', '.join(str(v) for v in values[:show]) + more


def _duplicates(ids: list) -> list:
  return [k for k, n in collections.Counter(ids).items() if n > 1]


def check_class_map(
  class_map: label_maps.ClassMap,
  num_classes: int,
  where: str,
  category_ids: str = 'keep',
) -> list[str]:
  """Problems of the class ids against the model's outputs
  (`category_ids`: the run's data.category_ids, for the suggested fix)."""
  bad = [k for k in class_map.names if not 1 <= k <= num_classes]
  if not bad:
    return []
  # 'contiguous' may give an identity map (categories already 1..K): then
  # suggesting 'contiguous' again would be no fix.
  if class_map.is_identity and category_ids != 'contiguous':
    fix = (
      f'Set model.num_classes >= {max(bad)}, or data.category_ids='
      "'contiguous' (coco_json) to number the categories 1..K"
    )
  else:
    fix = f'Set model.num_classes = {len(class_map.names)}'
  return [
    f'{where}: class ids {_examples(sorted(bad))} are not covered by '
    f'model.num_classes={num_classes} (class ids are 1..num_classes; '
    f'class id - 1 is the output channel, 0 is background). {fix}'
  ]


def check_coco_json(
  json_path: str,
  images_dir: str,
  class_map: label_maps.ClassMap,
  num_classes: int,
  split: str = 'train',
  category_ids: str = 'keep',
) -> Report:
  """Checks one COCO json split; raises DatasetError listing every problem."""
  coco = files.read_json(json_path)
  where = f'{split} json {json_path}'
  problems = check_class_map(class_map, num_classes, where, category_ids)
  images = coco.get('images', [])
  anns = coco.get('annotations', [])
  report = Report(split, num_images=len(images))

  dup = _duplicates([im['id'] for im in images])
  if dup:
    problems.append(
      f'{where}: duplicate image ids {_examples(dup)} (COCOeval would mix '
      'their boxes); give every image its own id'
    )
  dup = _duplicates([a['id'] for a in anns if 'id' in a])
  if dup:
    problems.append(
      f'{where}: duplicate annotation ids {_examples(dup)} (COCOeval '
      'keeps one box per id)'
    )
  listed = {c['id']: c.get('name') for c in coco.get('categories', [])}
  renamed = [
    f'{c}: {listed[c]!r} in the json, {class_map.names[k]!r} in the map'
    for k, c in class_map.category_ids.items()
    if c in listed and listed[c] != class_map.names[k]
  ]
  if renamed:
    problems.append(
      f'{where}: the label map names categories differently from the json '
      f'({_examples(renamed, 3)}): a label map of another dataset?'
    )
  to_class = class_map.category_to_class
  used = collections.Counter(int(a['category_id']) for a in anns)
  unlisted = sorted(set(used) - set(listed))
  if unlisted:
    problems.append(
      f'{where}: annotations use category ids {_examples(unlisted)} that '
      'its "categories" list does not have (it has '
      f'{_examples(sorted(listed))})'
    )
  uncovered = sorted(set(used) - set(to_class))
  if uncovered:
    mapped = [
      f'{c}: {class_map.names[k]}'
      for k, c in sorted(class_map.category_ids.items())
    ]
    problems.append(
      f'{where}: category ids {_examples(uncovered)} '
      f'({sum(used[c] for c in uncovered)} boxes) are not in the label map '
      f'(category id: name {_examples(mapped, 10)}); fix data.label_map or '
      'the json'
    )
  report.class_counts = {
    to_class[c]: n for c, n in sorted(used.items()) if c in to_class
  }

  sizes = {}
  bad_size = []
  for im in images:
    h, w = im.get('height', 0), im.get('width', 0)
    if not (h and w and h > 0 and w > 0):
      bad_size.append(im.get('file_name', im['id']))
    sizes[im['id']] = (float(h or 0), float(w or 0))
  if bad_size:
    problems.append(
      f'{where}: images without a positive width/height: {_examples(bad_size)}'
    )
  unknown = sorted({a['image_id'] for a in anns} - set(sizes))
  if unknown:
    problems.append(
      f'{where}: annotations of image ids {_examples(unknown)} that the '
      '"images" list does not have'
    )
  if split == 'eval':  # COCOeval reads both from every ground-truth box
    incomplete = [
      a.get('id') for a in anns if not {'area', 'iscrowd'} <= set(a)
    ]
    if incomplete:
      problems.append(
        f'{where}: annotations {_examples(incomplete)} lack "area" or '
        '"iscrowd", which COCOeval needs (it would fail after training)'
      )
  problems += _check_boxes(anns, sizes, report, where)
  problems += _check_files(images, images_dir, where)
  with_boxes = {a['image_id'] for a in anns}
  report.images_without_boxes = sum(im['id'] not in with_boxes for im in images)
  if problems:
    raise DatasetError(_message(problems))
  return report


def _check_boxes(anns, sizes, report, where) -> list[str]:
  known = [a for a in anns if a['image_id'] in sizes]
  report.num_boxes = len(anns)
  report.crowd_boxes = sum(bool(a.get('iscrowd', 0)) for a in anns)
  if not known:
    return []
  xywh = np.array([a['bbox'] for a in known], np.float64).reshape(-1, 4)
  hw = np.array([sizes[a['image_id']] for a in known], np.float64)
  x0, y0, bw, bh = xywh.T
  with np.errstate(invalid='ignore'):
    zero = ~((bw > 0) & (bh > 0))  # also non-finite
    tol = checks.OUTSIDE_TOLERANCE_PX
    outside = ~zero & (
      (x0 < -tol)
      | (y0 < -tol)
      | (x0 + bw > hw[:, 1] + tol)
      | (y0 + bh > hw[:, 0] + tol)
    )
  report.zero_area_boxes = int(zero.sum())
  if not outside.any():
    return []
  rows = [
    f'annotation {known[i].get("id")} of image {known[i]["image_id"]} '
    f'bbox {known[i]["bbox"]} in {int(hw[i, 1])}x{int(hw[i, 0])} (WxH)'
    for i in np.flatnonzero(outside)
  ]
  return [
    f'{where}: {len(rows)} boxes lie outside their image (bbox is '
    f'[x, y, w, h] in pixels): {_examples(rows, 3)}; clip or drop them'
  ]


def _check_files(images, images_dir, where) -> list[str]:
  """One directory listing per folder (cheap on GCS too)."""
  folders: dict[str, set[str] | None] = {}
  missing = []
  for im in images:
    path = files.join(images_dir, im['file_name'])
    folder, name = os.path.split(path)  # a string split: URLs too
    if folder not in folders:
      try:
        folders[folder] = set(files.listdir(folder or '.'))
      except OSError:  # no such folder (or not a folder)
        folders[folder] = None
    if folders[folder] is None or name not in folders[folder]:
      missing.append(path)
  if not missing:
    return []
  return [
    f'{where}: {len(missing)} of {len(images)} images have no file '
    f'(file_name is relative to the image folder {images_dir!r}): '
    f'{_examples(missing, 3)}'
  ]


def _message(problems: list[str]) -> str:
  return 'the dataset does not fit the config:\n  - ' + '\n  - '.join(problems)


def check_split(
  config: Any, split: str, class_map: label_maps.ClassMap
) -> Report | None:
  """Checks one split of the configured data (None: nothing to scan)."""
  data, num_classes = config.data, int(config.model.num_classes)
  if data.source == 'coco_json':
    if split == 'train':
      path, images = data.train_json, data.train_images
    else:
      path, images = data.eval_json, data.eval_images
    if not path:
      raise DatasetError(f'data.source=coco_json needs data.{split}_json')
    return check_coco_json(
      path, images, class_map, num_classes, split, data.category_ids
    )
  # Other sources: the class ids their own label map implies (records:
  # the map written beside them); a configured data.label_map may name
  # more classes than the data has, so it proves nothing here.
  if not data.label_map:
    where = f'{split} {data.source} label map'
    problems = check_class_map(class_map, num_classes, where, data.category_ids)
    if problems:
      raise DatasetError(_message(problems))
  return None


def check_label_map(
  workdir: str, class_map: label_maps.ClassMap, num_classes: int | None = None
) -> bool:
  """Stops when the workdir holds another label map; True if it has one.
  With `num_classes`, the saved map's classes 1..num_classes are compared
  (a workdir may hold names of classes the model has no output for)."""
  saved = label_maps.load_workdir(workdir)
  if saved is None:
    return False
  if num_classes is not None:
    saved = saved.for_model(num_classes)
  diff = saved.differences(class_map)
  if diff:
    path = files.join(workdir, label_maps.WORKDIR_FILE)
    raise DatasetError(
      f'the label map of this config differs from {path}, the one the '
      'checkpoints in this workdir were trained with (first value: the '
      'workdir, second: this config):\n  - '
      + '\n  - '.join(_flip(d) for d in diff)
      + '\nUse the same data.label_map / data.category_ids / dataset, or a '
      'new workdir (config.init_from re-initialises the class head).'
    )
  return True


def _flip(line: str) -> str:
  return line.replace(' here vs ', ' (workdir) vs ').rstrip() + ' (config)'


def verify(
  config: Any, workdir: str | None, splits: tuple[str, ...]
) -> tuple[label_maps.ClassMap, dict[str, Report]]:
  """Class map of the run, checked splits and the workdir's label map.

  The class map returned holds the classes the model predicts (ids
  1..model.num_classes): a named data.label_map may list more ('shapes'
  has 4 for the 3-class demo), which evaluation and drawing must not show.
  """
  # The model section first: this is the start-up point of training,
  # evaluation and inspect_data, so a mislabelled model or an image size
  # the network cannot take stops here, not after the first compile.
  model_checks.check(config.model)
  class_map = sources.class_map(config)
  reports: dict[str, Report] = {}
  if config.data.get('check_dataset', True):
    for split in splits:
      report = check_split(config, split, class_map)
      if report is not None:
        reports[split] = report
        logging.info('data check: %s', report.summary(class_map))
    k, n = len(class_map.names), int(config.model.num_classes)
    if 0 < k < n:
      logging.warning(
        'data check: %d classes, model.num_classes=%d: %d class outputs '
        'are never trained (the official VOC finetune does this with 21)',
        k,
        n,
        n - k,
      )
  num_classes = int(config.model.num_classes)
  class_map = class_map.for_model(num_classes)
  if workdir:
    check_label_map(workdir, class_map, num_classes)
  return class_map, reports


def prepare_training(config: Any, workdir: str) -> label_maps.ClassMap:
  """The trainer's start-up: checks the training split and the workdir's
  label map, saves the label map there (process 0), and resolves
  `train.num_examples_per_epoch <= 0` to the training json's size."""
  import jax  # noqa: PLC0415

  class_map, reports = verify(config, workdir, ('train',))
  t = config.train
  if t.num_examples_per_epoch <= 0 and t.num_steps <= 0:
    if 'train' not in reports:
      raise DatasetError(
        'train.num_examples_per_epoch <= 0 means "the training json\'s '
        'size", but this data source has no json: set it'
      )
    t.num_examples_per_epoch = reports['train'].num_images
    logging.info(
      'train.num_examples_per_epoch = %d (the training json)',
      t.num_examples_per_epoch,
    )
  if jax.process_index() == 0:
    label_maps.save_workdir(workdir, class_map)
  return class_map
