"""Drawn predictions of a trained workdir on its eval split.

  python -m effdet_jax.tools.draw_predictions --config=... --workdir=W
      [--num=16] [--min_score=0.4]

Writes `W/predictions/<name>.png` (boxes, class names, scores). `main.py`
calls `draw_eval_predictions` at the end of a run when
`eval.draw_predictions > 0` (the demo does).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from effdet_jax import api, files, inference


def _decoded(ex: dict[str, Any]) -> np.ndarray:
  import tensorflow as tf  # noqa: PLC0415

  if 'image' in ex:
    return np.asarray(ex['image'])
  data = ex.get('encoded', b'')
  if not data and ex.get('path'):
    data = tf.io.read_file(ex['path'])
  return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()


def draw_eval_predictions(
  config: Any, workdir: str, num: int = 16, min_score: float = 0.4
) -> str:
  """Draws the first `num` eval images with the workdir's EMA detections."""
  from effdet_jax.data import sources  # noqa: PLC0415

  model, variables = loaded = api.load(workdir)
  predictor = inference.Predictor(
    model,
    variables,
    loaded.config,
    label_map=sources.label_map(config),
    nms_method=config.eval.nms_method,
  )
  out_dir = files.join(workdir, 'predictions')
  files.makedirs(out_dir)
  examples = sources.raw_examples(config, 'eval').take(num)
  from PIL import Image  # noqa: PLC0415

  for i, ex in enumerate(examples.as_numpy_iterator()):
    image = _decoded(ex)
    (det,) = predictor.predict_arrays([image], min_score)
    name = ex.get('name', b'')
    name = name.decode() if isinstance(name, bytes) else str(name)
    stem = os.path.splitext(os.path.basename(name))[0] or f'image_{i:03d}'
    with files.open(files.join(out_dir, f'{stem}.png'), 'wb') as f:
      Image.fromarray(inference.draw(image, det)).save(f, format='PNG')
  return out_dir


def _define_flags() -> None:
  """The program's flags; defined only when it runs as a program (absl
  flags are process-global: importing two tools into one process must not
  define --config twice)."""
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  config_flags.DEFINE_config_file('config', None, 'Run config file.')
  flags.DEFINE_string('workdir', None, 'Training workdir.')
  flags.DEFINE_integer('num', 16, 'Images to draw.')
  flags.DEFINE_float('min_score', 0.4, 'Score threshold.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  from absl import flags  # noqa: PLC0415

  f = flags.FLAGS
  print(draw_eval_predictions(f.config, f.workdir, f.num, f.min_score))


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
