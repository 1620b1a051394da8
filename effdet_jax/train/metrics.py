"""Metric writers: TensorBoard + stdout (clu) and a JSON-lines file.

Only process 0 writes; other processes get a writer that only logs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers

METRICS_FILE = 'metrics.jsonl'


class JsonlWriter(metric_writers.MetricWriter):
  """Appends `{"step": s, name: value, ...}` lines to metrics.jsonl."""

  def __init__(self, workdir: str):
    self._path = os.path.join(workdir, METRICS_FILE)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {'step': int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    with open(self._path, 'a') as f:
      f.write(json.dumps(row) + '\n')

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


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard + logging + metrics.jsonl on process 0; logging elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  writers = [metric_writers.create_default_writer(workdir, asynchronous=False)]
  # Object stores (gs://) cannot append: TensorBoard events only there.
  if '://' not in workdir:
    writers.append(JsonlWriter(workdir))
  return metric_writers.MultiWriter(writers)


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """Rows of workdir/metrics.jsonl."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]
