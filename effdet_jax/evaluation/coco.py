"""COCO box evaluation on the host: detections -> the 12 COCO metrics.

`COCOEvaluator` accumulates detections (original-image pixels, yxyx, the
1-based class ids the batches carry) image by image, converts them to COCO
`[x, y, w, h]` rows with the dataset's category ids, and runs COCOeval
(pycocotools, or faster-coco-eval's C++ port as the fast option). Ground
truth is an annotation json when the data has one, else it is built from
the eval batches the way the official code does
(`efficientdet/coco_metric.py: EvaluationMetric.update_state`: boxes in
original pixels, area recomputed from the box, iscrowd from the data).

One deliberate difference from the official `coco_metric.py`: COCOeval is
restricted to the images that were *evaluated* (all of them, or the first
`eval.num_images`), not to the images that happen to have a detection, so an
image the model misses entirely still counts against recall.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from effdet_jax import files

METRIC_NAMES = (
  'AP',
  'AP50',
  'AP75',
  'APs',
  'APm',
  'APl',
  'ARmax1',
  'ARmax10',
  'ARmax100',
  'ARs',
  'ARm',
  'ARl',
)
BACKENDS = ('pycocotools', 'faster_coco_eval')

# Why COCOeval reports -1 for a metric: it had no ground truth to score.
_SIZE_RULES = {
  's': 'small (area < 32^2)',
  'm': 'medium (32^2 <= area < 96^2)',
  'l': 'large (area >= 96^2)',
}

# The official test-dev submission file name (coco_metric.py).
TESTDEV_FILE = 'detections_test-dev2017_test_results.json'


@dataclasses.dataclass
class EvalResult:
  """What one evaluation produced.

  metrics: the 12 COCO numbers as fractions (-1: nothing to score).
  per_class: {category name: AP@[.5:.95] at maxDets 100} (-1: no ground
    truth of that class in the evaluated images).
  detections: COCO result dicts (image_id, category_id, bbox, score).
  num_images: images evaluated.
  testdev: True when the annotations have no boxes (a test split): the
    metrics are all -1 and `detections` is the submission.
  """

  metrics: dict[str, float]
  per_class: dict[str, float]
  detections: list[dict[str, Any]]
  num_images: int
  testdev: bool = False
  summary: str = ''


def yxyx_to_xywh(boxes: np.ndarray) -> np.ndarray:
  """[..., 4] (ymin, xmin, ymax, xmax) -> COCO (x, y, width, height)."""
  boxes = np.asarray(boxes, np.float64)
  y0, x0, y1, x1 = np.moveaxis(boxes, -1, 0)
  return np.stack([x0, y0, x1 - x0, y1 - y0], axis=-1)


class COCOEvaluator:
  """Accumulates detections of one evaluation pass and scores them.

  Args:
    annotations: a COCO json path or dict as ground truth; None to build it
      from `add_ground_truth` calls (data without an annotation file).
    label_map: {class id: name}; names for the per-class table and, when
      the ground truth is built, its category list.
    class_to_category: {1-based class id: dataset category id}; None is
      the identity (COCO and our coco_json / tfrecord / tfds sources keep
      the dataset's ids as class ids). Detections of a class with no
      category in the ground truth are dropped (and counted in the log).
    backend: 'pycocotools' or 'faster_coco_eval'.
  """

  def __init__(
    self,
    annotations: str | Mapping[str, Any] | None = None,
    label_map: Mapping[int, str] | None = None,
    class_to_category: Mapping[int, int] | None = None,
    backend: str = 'pycocotools',
  ):
    if backend not in BACKENDS:
      raise ValueError(f'unknown eval backend {backend!r}; valid: {BACKENDS}')
    if backend == 'faster_coco_eval':
      try:
        import faster_coco_eval  # noqa: F401, PLC0415
      except ImportError as err:
        raise ImportError(
          'eval.backend=faster_coco_eval needs `pip install '
          'effdet_jax[fast-eval]` (faster-coco-eval)'
        ) from err
    self.backend = backend
    self.label_map = dict(label_map or {})
    self.class_to_category = (
      None if class_to_category is None else dict(class_to_category)
    )
    if isinstance(annotations, str):  # a local path or a URL
      annotations = files.read_json(annotations)
    self._dataset = None if annotations is None else dict(annotations)
    self._gt_cache = None  # (backend COCO object) for a json ground truth
    self.reset()

  @property
  def builds_ground_truth(self) -> bool:
    return self._dataset is None

  def reset(self) -> None:
    """Forgets the detections (and built ground truth) of a previous pass."""
    self._rows: list[np.ndarray] = []
    self._image_ids: list[int] = []
    self._gt_images: list[dict] = []
    self._gt_annotations: list[dict] = []

  # -- accumulation ----------------------------------------------------------

  def add_detections(
    self,
    image_ids: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
  ) -> None:
    """One batch of real images (padding examples already removed).

    Args:
      image_ids: [B] dataset image ids.
      boxes: [B, K, 4] yxyx in original-image pixels.
      scores: [B, K].
      classes: [B, K] 1-based class ids, <= 0 for unused slots.
    """
    image_ids = np.asarray(image_ids).reshape(-1)
    classes = np.asarray(classes)
    keep = classes > 0
    b, k = classes.shape
    ids = np.broadcast_to(image_ids[:, None], (b, k))[keep]
    xywh = yxyx_to_xywh(np.asarray(boxes))[keep]
    score = np.asarray(scores, np.float64)[keep]
    rows = np.concatenate(
      [ids[:, None], xywh, score[:, None], classes[keep][:, None]], axis=1
    )
    self._rows.append(rows)
    self._image_ids.extend(int(i) for i in image_ids)

  def add_ground_truth(
    self,
    image_ids: np.ndarray,
    image_sizes: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    is_crowd: np.ndarray,
  ) -> None:
    """Ground truth of one batch of real images (when no json is given).

    Args:
      image_ids: [B]; image_sizes: [B, 2] original (height, width).
      boxes: [B, M, 4] yxyx in original-image pixels.
      classes: [B, M] 1-based class ids, <= 0 for padding rows.
      is_crowd: [B, M].
    """
    if not self.builds_ground_truth:
      return
    xywh = yxyx_to_xywh(boxes)
    for i, image_id in enumerate(np.asarray(image_ids).reshape(-1)):
      h, w = (int(v) for v in image_sizes[i])
      self._gt_images.append({'id': int(image_id), 'height': h, 'width': w})
      for j in np.flatnonzero(np.asarray(classes[i]) > 0):
        x, y, bw, bh = (float(v) for v in xywh[i, j])
        self._gt_annotations.append(
          {
            'id': len(self._gt_annotations) + 1,
            'image_id': int(image_id),
            'category_id': self._category(int(classes[i, j])),
            'bbox': [x, y, bw, bh],
            # Official: the area is recomputed from the box
            # (`efficientdet/coco_metric.py: EvaluationMetric.update_state`).
            'area': bw * bh,
            'iscrowd': int(is_crowd[i, j]),
          }
        )

  def _category(self, class_id: int) -> int:
    if self.class_to_category is None:
      return class_id
    # A class the map lacks (an untrained output) has no category: -1,
    # dropped before scoring like any detection without one.
    return int(self.class_to_category.get(class_id, -1))

  # -- scoring ---------------------------------------------------------------

  def ground_truth(self) -> dict[str, Any]:
    """The ground-truth COCO dataset dict this pass is scored against."""
    if self._dataset is not None:
      return self._dataset
    ids = sorted(self.label_map) or sorted(
      {a['category_id'] for a in self._gt_annotations}
    )
    return {
      'images': self._gt_images,
      'annotations': self._gt_annotations,
      'categories': [
        {'id': self._category(c), 'name': self.label_map.get(c, str(c))}
        for c in ids
      ],
    }

  def detections(self) -> list[dict[str, Any]]:
    """The accumulated detections as COCO result dicts (all classes)."""
    rows = self._all_rows()
    out = []
    for r in rows:
      out.append(
        {
          'image_id': int(r[0]),
          'category_id': self._category(int(r[6])),
          'bbox': [float(r[1]), float(r[2]), float(r[3]), float(r[4])],
          'score': float(r[5]),
        }
      )
    return out

  def _all_rows(self) -> np.ndarray:
    if not self._rows:
      return np.zeros([0, 7])
    return np.concatenate(self._rows, axis=0)

  def evaluate(self) -> EvalResult:
    """Scores everything added since `reset` (runs COCOeval)."""
    dataset = self.ground_truth()
    image_ids = sorted(set(self._image_ids))
    detections = self.detections()
    if not dataset.get('annotations'):
      logging.warning(
        'eval: the ground truth has no boxes (a test split?): metrics are '
        '-1; the %d detections are the submission file',
        len(detections),
      )
      return EvalResult(
        {k: -1.0 for k in METRIC_NAMES},
        {},
        _testdev_rounding(detections),
        len(image_ids),
        testdev=True,
      )
    categories = {c['id']: c['name'] for c in dataset['categories']}
    scored = [d for d in detections if d['category_id'] in categories]
    if len(scored) < len(detections):
      logging.info(
        'eval: %d of %d detections have a class with no category in the '
        'ground truth; COCOeval ignores them',
        len(detections) - len(scored),
        len(detections),
      )
    coco_eval, summary = self._run_cocoeval(dataset, scored, image_ids)
    metrics = {
      name: float(v)
      for name, v in zip(METRIC_NAMES, coco_eval.stats[:12], strict=True)
    }
    per_class = _per_class_ap(coco_eval, categories, self.label_map)
    _explain_missing(metrics, per_class)
    return EvalResult(
      metrics, per_class, detections, len(image_ids), summary=summary
    )

  def _gt_coco(self, dataset: dict[str, Any]) -> Any:
    if self._dataset is not None and self._gt_cache is not None:
      return self._gt_cache  # a json's index is built once per evaluator
    gt = _coco_class(self.backend)()
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
      gt.createIndex()
    if self._dataset is not None:
      self._gt_cache = gt
    return gt

  def _run_cocoeval(
    self, dataset: dict, detections: list[dict], image_ids: Sequence[int]
  ) -> tuple[Any, str]:
    gt = self._gt_coco(dataset)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      if detections:
        dt = gt.loadRes(detections)
      else:  # loadRes cannot take an empty list; nothing found: AP 0
        dt = _coco_class(self.backend)()
        dt.dataset = {
          'images': list(dataset['images']),
          'annotations': [],
          'categories': list(dataset['categories']),
        }
        dt.createIndex()
      coco_eval = _cocoeval_class(self.backend)(gt, dt, 'bbox')
      coco_eval.params.imgIds = list(image_ids)
      coco_eval.evaluate()
      coco_eval.accumulate()
      coco_eval.summarize()
    return coco_eval, out.getvalue()


def _coco_class(backend: str):
  if backend == 'faster_coco_eval':
    from faster_coco_eval import COCO  # noqa: PLC0415
  else:
    from pycocotools.coco import COCO  # noqa: PLC0415
  return COCO


def _cocoeval_class(backend: str):
  if backend == 'faster_coco_eval':
    from faster_coco_eval import COCOeval_faster  # noqa: PLC0415

    return COCOeval_faster
  from pycocotools.cocoeval import COCOeval  # noqa: PLC0415

  return COCOeval


def _per_class_ap(
  coco_eval: Any, categories: Mapping[int, str], label_map: Mapping[int, str]
) -> dict[str, float]:
  """Official per-class AP: mean precision over IoUs and recalls, area
  'all', maxDets 100, of the entries that exist (> -1)."""
  precision = coco_eval.eval['precision']  # [T, R, K, A, M]
  out = {}
  for k, cat in enumerate(coco_eval.params.catIds):
    p = precision[:, :, k, 0, -1]
    p = p[p > -1]
    name = label_map.get(cat) or categories.get(cat) or str(cat)
    if name in out:  # two categories with one name: keep both visible
      name = f'{name} ({cat})'
    out[name] = float(np.mean(p)) if p.size else -1.0
  return out


def _explain_missing(
  metrics: Mapping[str, float], per_class: Mapping[str, float]
) -> None:
  """A -1 is not a score: say which ground truth was missing (one line)."""
  by_kind: dict[str, list[str]] = {}
  for name, value in metrics.items():
    if value != -1.0:
      continue
    size = name[-1] if name[-1] in _SIZE_RULES else None
    what = f'{_SIZE_RULES[size]} boxes' if size else 'boxes at all'
    by_kind.setdefault(what, []).append(name)
  parts = [f'{", ".join(names)} ({what})' for what, names in by_kind.items()]
  missing = [n for n, v in per_class.items() if v == -1.0]
  if missing:
    parts.append(
      f'per-class AP of {len(missing)} classes ('
      + ', '.join(missing[:20])
      + (' ...' if len(missing) > 20 else '')
      + ')'
    )
  if parts:
    logging.info(
      'eval: -1 = no such ground truth in the evaluated images: %s',
      '; '.join(parts),
    )


def _testdev_rounding(detections: list[dict]) -> list[dict]:
  """The official submission rounding: bbox 2 decimals, score 3."""
  return [
    {
      'image_id': d['image_id'],
      'category_id': d['category_id'],
      'bbox': [round(v, 2) for v in d['bbox']],
      'score': round(d['score'], 3),
    }
    for d in detections
  ]


def format_table(
  metrics: Mapping[str, Mapping[str, float]],
  per_class: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
  """Metrics (and per-class AP) of one or more weight sets side by side.

  `metrics` maps a column title ('ema', 'raw') to its 12 metrics.
  """
  columns = list(metrics)
  lines = ['metric     ' + ''.join(f'{c:>10}' for c in columns)]
  for name in METRIC_NAMES:
    values = ''.join(f'{metrics[c].get(name, -1.0):10.4f}' for c in columns)
    lines.append(f'{name:<11}{values}')
  if per_class:
    names = list(next(iter(per_class.values())))
    width = max([len(n) for n in names] + [10])
    lines.append('per-class AP'.ljust(width + 1))
    for n in names:
      values = ''.join(f'{per_class[c].get(n, -1.0):10.4f}' for c in columns)
      lines.append(f'  {n:<{width}}{values}')
  return '\n'.join(lines)
