r"""Draws what the model will see: augmented samples with their boxes.

  python -m effdet_jax.tools.show_data --config=configs/d0.py \
      --split=train --num=16 --output=/tmp/show [--config.data.source=...]

Writes one PNG per example (the network input, de-normalised, padding
included) with its boxes and class names, and prints the data counters
(skipped records, negatives).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw

from effdet_jax import files


def denormalize(image: np.ndarray, model: Any) -> np.ndarray:
  """Network input -> uint8 RGB (undoes scale_range and mean/std)."""
  if model.scale_range:
    image = (image + 1.0) * 255.0 / 2.0
  image = image * np.array(model.stddev_rgb) + np.array(model.mean_rgb)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def draw(
  image: np.ndarray,
  boxes: np.ndarray,
  classes: np.ndarray,
  names: dict[int, str],
) -> PIL.Image.Image:
  """uint8 image + yxyx pixel boxes (classes <= 0 are padding)."""
  pil = PIL.Image.fromarray(image)
  pen = PIL.ImageDraw.Draw(pil)
  for box, cls in zip(boxes, classes, strict=True):
    if cls <= 0:
      continue
    y0, x0, y1, x1 = (float(v) for v in box)
    hue = (int(cls) * 67) % 255
    colour = (255 - hue, hue, (hue * 3) % 255)
    # A black rim keeps the box visible on any background.
    pen.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline=(0, 0, 0), width=4)
    pen.rectangle([x0, y0, x1, y1], outline=colour, width=2)
    label = names.get(int(cls), str(int(cls)))
    pen.text((x0 + 3, y0 + 2), label, fill=(0, 0, 0))
    pen.text((x0 + 2, y0 + 1), label, fill=colour)
  return pil


def show(config: Any, split: str, num: int, output: str) -> list[str]:
  """Writes `num` PNGs of the `split` pipeline's output; returns paths."""
  from effdet_jax.data import checks, pipeline, sources
  from effdet_jax.data import config as data_cfg

  if 'strict' not in config.data:  # a run config from before the data
    merged = data_cfg.data_config()  # section existed: fill defaults
    merged.update(config.data)
    config.data = merged
  stats = checks.DataStats(strict=config.data.strict)
  if split == 'train':
    ds = pipeline.train_dataset(config, stats=stats)
  else:
    ds = pipeline.eval_dataset(config, stats=stats)
  names = sources.label_map(config)
  files.makedirs(output)
  paths = []
  for batch in ds.as_numpy_iterator():
    for i in range(batch['image'].shape[0]):
      if len(paths) == num or batch.get('valid', [True] * 99)[i] is False:
        continue
      pil = draw(
        denormalize(batch['image'][i], config.model),
        batch['boxes'][i],
        batch['classes'][i],
        names,
      )
      path = files.join(
        output, f'{split}_{len(paths):03d}_id{int(batch["image_id"][i])}.png'
      )
      with files.open(path, 'wb') as f:
        pil.save(f, format='PNG')
      paths.append(path)
    if len(paths) == num:
      break
  print(f'wrote {len(paths)} images to {output}; data: {stats.summary()}')
  return paths


def _define_flags() -> None:
  """The program's flags; defined only when it runs as a program (absl
  flags are process-global: importing two tools into one process must not
  define --config twice)."""
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  config_flags.DEFINE_config_file('config', None, 'run config file')
  flags.DEFINE_enum('split', 'train', ['train', 'eval'], 'which pipeline')
  flags.DEFINE_integer('num', 16, 'how many examples')
  flags.DEFINE_string('output', None, 'folder for the PNGs')
  flags.mark_flags_as_required(['config', 'output'])


def main(argv):
  del argv
  from absl import flags  # noqa: PLC0415

  f = flags.FLAGS
  config = f.config
  config.unlock()
  show(config, f.split, f.num, f.output)


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
