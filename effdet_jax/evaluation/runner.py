"""COCO evaluation of model variables on the configured eval split.

`Evaluator(config).run(variables, step)` is built once: the
model, anchors, the jitted forward + post-processing, the eval dataset and
the ground truth are made in the constructor and reused by every call, so a
periodic evaluation compiles once. The trainer gets
`make_evaluate_fn(config, workdir)`; `--mode=eval` calls
`evaluate_checkpoint(config, workdir)`.

Per pass: every host reads its shard of the eval data (padded batches,
`valid=False` rows are padding; with several processes the hosts agree on
each step, so they all run the same number of steps), the device runs the
detector, the host converts the previous batch while the device works on
the next one, and process 0 runs COCOeval and writes
`workdir/eval/step_<N>.json` (12 metrics + per-class AP) and the detections
json.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from effdet_jax import api, files, inference
from effdet_jax.detection import anchors as anchors_lib
from effdet_jax.detection import postprocess as postprocess_lib
from effdet_jax.evaluation import coco
from effdet_jax.runtime import partitioning

EVAL_DIR = 'eval'
WEIGHTS = ('ema', 'raw', 'both')
# Batch keys the ground truth needs when no annotation json is given.
_GT_KEYS = ('boxes', 'classes', 'is_crowd', 'image_size')


def annotations_path(config: Any) -> str:
  """The ground-truth json of the eval split ('' = build from batches)."""
  if config.eval.annotations_json:
    return config.eval.annotations_json
  if config.data.source == 'coco_json':
    return config.data.eval_json
  return ''


class Evaluator:
  """COCO evaluation of model variables; construct once, `run` often."""

  def __init__(self, config: Any, workdir: str | None = None):
    from effdet_jax.data import checks, dataset_checks, pipeline  # noqa: PLC0415

    # Before any compile: the eval split and the workdir's label map.
    # The classes the model predicts (ids 1..num_classes): a named map
    # may list more, which would show as per-class AP -1.
    class_map, _ = dataset_checks.verify(config, workdir, ('eval',))
    self.config = config
    self.workdir = workdir
    e = config.eval
    if e.weights not in WEIGHTS:
      raise ValueError(f'eval.weights={e.weights!r}; valid: {WEIGHTS}')
    self.model = api.build_model(config.model)
    anchors = anchors_lib.anchors_from_config(config.model)
    self.mesh = partitioning.make_mesh(config.mesh)
    data_size = self.mesh.shape['data']
    if int(e.batch_size) % data_size:
      raise ValueError(
        f'eval.batch_size={e.batch_size} must be a multiple of the mesh '
        f'data axis ({data_size} devices)'
      )
    self._replicated = NamedSharding(self.mesh, P())
    self._sharding = NamedSharding(self.mesh, P('data'))
    detect = inference.make_detect_fn(
      self.model, anchors, **postprocess_lib.postprocess_kwargs(config)
    )
    self._detect = jax.jit(detect)
    self.stats = checks.DataStats(strict=bool(config.data.strict))
    self._dataset = pipeline.eval_dataset(config, stats=self.stats)
    self.host_batch = pipeline.host_batch_size(
      int(e.batch_size), jax.process_count()
    )
    self.label_map = class_map.names
    path = annotations_path(config)
    self.coco = coco.COCOEvaluator(
      annotations=path or None,
      label_map=self.label_map,
      # Results carry the dataset's category ids ('contiguous' ids).
      class_to_category=None
      if class_map.is_identity
      else class_map.category_ids,
      backend=e.backend,
    )
    logging.info(
      'eval: ground truth %s, backend %s, weights %s',
      path or 'built from the eval batches',
      e.backend,
      e.weights,
    )

  # -- batches ---------------------------------------------------------------

  def _padding_batch(self) -> dict[str, np.ndarray]:
    b, m = self.host_batch, int(self.config.data.max_instances_per_image)
    h, w = inference._params(self.config.model).image_size  # noqa: SLF001
    return {
      'image': np.zeros([b, h, w, 3], np.float32),
      'image_scale': np.ones([b], np.float32),
      'image_id': -np.ones([b], np.int32),
      'valid': np.zeros([b], bool),
      'boxes': -np.ones([b, m, 4], np.float32),
      'classes': -np.ones([b, m], np.int32),
      'is_crowd': np.zeros([b, m], np.int32),
      'image_size': np.zeros([b, 2], np.int32),
    }

  def batches(self) -> Iterator[dict[str, np.ndarray]]:
    """This host's eval batches; with several processes every host yields
    the same number (padding batches after its data runs out)."""
    quota = int(self.config.eval.num_images)
    if quota > 0:  # this host's share of the first N images
      quota = math.ceil(quota / jax.process_count())
    seen = 0
    it = self._dataset.as_numpy_iterator()
    while True:
      batch = next(it, None) if (quota <= 0 or seen < quota) else None
      if batch is not None and quota > 0:
        valid = batch['valid'].copy()
        ranks = np.cumsum(valid)
        valid &= ranks + seen <= quota
        seen += int(valid.sum())
        batch['valid'] = valid
      if jax.process_count() > 1:
        more = multihost_utils.process_allgather(np.array(batch is not None))
        if not np.any(more):
          return
        if batch is None:
          batch = self._padding_batch()
      elif batch is None:
        return
      yield batch

  def _gather(self, tree: Any) -> Any:
    """Device (or host-local) arrays -> numpy of the global batch."""
    if jax.process_count() == 1:
      return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)

  # -- one pass --------------------------------------------------------------

  def run(self, variables: Any, step: int | None = None) -> coco.EvalResult:
    """Detections of every eval image with these variables, scored.

    Every process must call this; only process 0 runs COCOeval (the
    others get its metrics, so checkpoint decisions agree).
    """
    variables = jax.device_put(variables, self._replicated)
    keep_gt = self.coco.builds_ground_truth
    self.coco.reset()
    start = time.perf_counter()
    pending = None
    num_batches = num_images = 0
    for batch in self.batches():
      meta_keys = ('image_id', 'image_scale', 'valid')
      meta = {k: batch[k] for k in meta_keys + (_GT_KEYS if keep_gt else ())}
      if jax.process_count() > 1:
        meta = pipeline_global(meta, self._sharding)
      images = jax.make_array_from_process_local_data(
        self._sharding, batch['image']
      )
      scales = jax.make_array_from_process_local_data(
        self._sharding, batch['image_scale']
      )
      det = self._detect(variables, images, scales)  # async dispatch
      if pending is not None:  # host work overlaps the device's next batch
        num_images += self._consume(*pending)
      pending = (det, meta)
      num_batches += 1
      if num_batches % 50 == 0:
        rate = num_images / max(time.perf_counter() - start, 1e-9)
        logging.info('eval: %d batches, %.1f images/s', num_batches, rate)
    if pending is not None:
      num_images += self._consume(*pending)
    infer_s = time.perf_counter() - start
    result = self._score(num_images)
    total_s = time.perf_counter() - start
    logging.info(
      'eval%s: %d images, detection %.1f s (%.1f images/s), total %.1f s',
      '' if step is None else f' step {step}',
      num_images,
      infer_s,
      num_images / max(infer_s, 1e-9),
      total_s,
    )
    if self.stats.counts:
      logging.info('eval data: %s (cumulative)', self.stats.summary())
    return result

  def _consume(self, det: Any, meta: dict) -> int:
    det, meta = self._gather((det, meta))
    if jax.process_index() != 0:
      return int(np.sum(meta['valid']))
    valid = np.asarray(meta['valid'], bool)
    ids = np.asarray(meta['image_id'])[valid]
    self.coco.add_detections(
      ids, det.boxes[valid], det.scores[valid], det.classes[valid]
    )
    if self.coco.builds_ground_truth:
      # Batch boxes are in network-input pixels; x image_scale = original.
      scale = np.asarray(meta['image_scale'], np.float64)[valid]
      boxes = np.asarray(meta['boxes'], np.float64)[valid]
      self.coco.add_ground_truth(
        ids,
        meta['image_size'][valid],
        boxes * scale[:, None, None],
        meta['classes'][valid],
        meta['is_crowd'][valid],
      )
    return int(valid.sum())

  def _score(self, num_images: int) -> coco.EvalResult:
    if jax.process_index() == 0:
      result = self.coco.evaluate()
    else:
      result = coco.EvalResult({}, {}, [], num_images)
    if jax.process_count() > 1:  # everyone acts on process 0's numbers
      values = np.array(
        [result.metrics.get(k, -1.0) for k in coco.METRIC_NAMES], np.float64
      )
      values = multihost_utils.broadcast_one_to_all(values)
      result.metrics = dict(
        zip(coco.METRIC_NAMES, map(float, values), strict=True)
      )
    return result

  # -- metrics of a train state ------------------------------------------------

  def evaluate(self, weights: dict[str, Any], step: int) -> dict[str, float]:
    """Evaluates one or two weight sets ({'ema': vars, 'raw': vars}), logs
    them side by side, writes the step's json files (process 0) and returns
    the flat metrics: the first set's 12 numbers, the second's prefixed
    with its name (`raw/AP`)."""
    results = {name: self.run(v, step) for name, v in weights.items()}
    names = list(results)
    primary = results[names[0]]
    metrics = dict(primary.metrics)
    for name in names[1:]:
      metrics.update(
        {f'{name}/{k}': v for k, v in results[name].metrics.items()}
      )
    if jax.process_index() == 0:
      table = coco.format_table(
        {n: r.metrics for n, r in results.items()},
        {n: r.per_class for n, r in results.items()},
      )
      logging.info(
        'COCO eval, step %d (%s):\n%s', step, ', '.join(names), table
      )
      if self.workdir:
        write_results(self.workdir, step, results)
    return metrics


def pipeline_global(meta: dict, sharding: Any) -> dict:
  """Host-local metadata -> global arrays laid out like the images, so a
  gather returns them in the same order as the detections."""
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in meta.items()
  }


def write_results(
  workdir: str, step: int, results: dict[str, coco.EvalResult]
) -> str:
  """`eval/step_<N>.json` (+ detections json, test-dev submission)."""
  out_dir = files.join(workdir, EVAL_DIR)
  files.makedirs(out_dir)
  names = list(results)
  primary = results[names[0]]
  record: dict[str, Any] = dict(primary.metrics)
  record['per_class'] = primary.per_class
  record.update(step=int(step), weights=names[0], num_images=primary.num_images)
  for name in names[1:]:
    record[name] = dict(
      results[name].metrics, per_class=results[name].per_class
    )
  path = files.join(out_dir, f'step_{step}.json')
  _write_json(path, record)
  for i, name in enumerate(names):
    suffix = '' if i == 0 else f'_{name}'
    _write_json(
      files.join(out_dir, f'detections_step_{step}{suffix}.json'),
      results[name].detections,
    )
  if primary.testdev:
    _write_json(files.join(out_dir, coco.TESTDEV_FILE), primary.detections)
  return path


def _write_json(path: str, obj: Any) -> None:
  files.write_json(path, obj)  # a reader never sees half a file


def _weight_sets(state: Any, which: str) -> dict[str, Any]:
  if which == 'ema':
    return {'ema': state.variables(ema=True)}
  if which == 'raw':
    return {'raw': state.variables(ema=False)}
  return {'ema': state.variables(ema=True), 'raw': state.variables(ema=False)}


def make_evaluate_fn(
  config: Any, workdir: str
) -> Callable[[Any, int], dict[str, float]]:
  """`(TrainState, step) -> metrics` for the trainer, built once."""
  evaluator = Evaluator(config, workdir)

  def evaluate_fn(state: Any, step: int) -> dict[str, float]:
    return evaluator.evaluate(
      _weight_sets(state, config.eval.weights), int(step)
    )

  evaluate_fn.evaluator = evaluator  # for tools and tests
  return evaluate_fn


def restore_weights(
  workdir: str, model: Any, which: str, step: int | None = None
) -> tuple[int, dict[str, Any]]:
  """(step, {'ema'|'raw': variables}) from a training workdir."""
  from effdet_jax.runtime import checkpoint  # noqa: PLC0415

  items: dict[str, Any] = {}
  if which in ('ema', 'both'):
    items['variables'] = api.abstract_variables(model)
  if which in ('raw', 'both'):
    # The raw weights live only in the full train state: restored without
    # a target (nested dicts), keeping the two model collections.
    items['state'] = None
  if not checkpoint.is_training_workdir(workdir):
    raise FileNotFoundError(
      f'no checkpoint in {checkpoint.checkpoint_dir(workdir)}'
    )
  # The newest readable step (a corrupt newest one is named and skipped).
  restored_step, out = checkpoint.restore_read_only(
    workdir, items, None if step is None else int(step)
  )
  weights: dict[str, Any] = {}
  if 'variables' in out:
    weights['ema'] = out['variables']
  if 'state' in out:
    state = out['state']
    weights['raw'] = {
      'params': state['params'],
      'batch_stats': state['batch_stats'],
    }
  return restored_step, weights


def evaluate_checkpoint(config: Any, workdir: str) -> dict[str, float]:
  """`--mode=eval`: the latest (or `eval.checkpoint_step`) checkpoint of
  the workdir, scored and written like a training-time evaluation."""
  from effdet_jax.runtime import metrics as metric_writers  # noqa: PLC0415

  evaluator = Evaluator(config, workdir)
  step, weights = restore_weights(
    workdir, evaluator.model, config.eval.weights, config.eval.checkpoint_step
  )
  metrics = evaluator.evaluate(weights, step)
  writer = metric_writers.create_writer(workdir)
  writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
  writer.flush()
  return metrics
