"""Metric writers: TensorBoard (clu) and a JSON-lines file.

Only process 0 writes, to a local workdir or a URL (files.py: on an
object store each metrics.jsonl append rewrites the object). The console
is not a metric writer: the trainer logs one line per log step
(`train/trainer.py: progress_line`) and the evaluator its COCO table;
`create_writer(..., log_to_console=True)` adds clu's one-line-per-write
logging writer back.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers

from effdet_jax import files

METRICS_FILE = 'metrics.jsonl'


class JsonlWriter(metric_writers.MetricWriter):
  """Appends `{"step": s, name: value, ...}` lines to metrics.jsonl."""

  def __init__(self, workdir: str):
    self._path = files.join(workdir, METRICS_FILE)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {'step': int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    files.append_text(self._path, json.dumps(row) + '\n')

  def write_summaries(self, step, values, metadata=None):  # noqa: D102
    del step, values, metadata

  def write_images(self, step, images):  # noqa: D102
    del step, images

  def write_videos(self, step, videos):  # noqa: D102
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):  # noqa: D102
    del step, audios, sample_rate

  def write_texts(self, step, texts):  # noqa: D102
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):  # noqa: D102
    del step, arrays, num_buckets

  def write_hparams(self, hparams):  # noqa: D102
    del hparams

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def create_writer(
  workdir: str, log_to_console: bool = False
) -> metric_writers.MetricWriter:
  """TensorBoard + metrics.jsonl on process 0 (+ a logged line per write
  with `log_to_console`, on every process)."""
  console = [metric_writers.LoggingWriter()] if log_to_console else []
  if jax.process_index() != 0:
    return metric_writers.MultiWriter(console)
  writers = [
    *console,
    metric_writers.SummaryWriter(workdir),
    JsonlWriter(workdir),
  ]
  return metric_writers.MultiWriter(writers)


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """Rows of workdir/metrics.jsonl."""
  text = files.read_text(files.join(workdir, METRICS_FILE))
  return [json.loads(line) for line in text.splitlines() if line.strip()]
