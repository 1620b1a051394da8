"""Detect objects in images, a folder or a video; write json + drawings.

  python -m effdet_jax.tools.infer --checkpoint=DIR --input=IMAGE|DIR|VIDEO \\
      --output=DIR [--config=configs/demo.py] [--min_score=0.4] \\
      [--max_boxes=100] [--batch_size=8] [--dtype=bfloat16]

`--checkpoint` is a training workdir (its EMA weights) or a converter
directory; the model config saved there is authoritative (`--dtype`, if
given, overrides only its compute dtype: a converted checkpoint computes in
float32, a D6-D7x workdir in its recipe's bfloat16). `--config`, if
given, supplies the NMS method and, when the checkpoint has no
`label_map.json` (a training workdir has), the class names.
Writes `OUTPUT/detections.json` (COCO result dicts, `image_id` = the file
name, or the frame number for a video) and one drawn PNG per image. A file
that cannot be decoded is reported and skipped; the others are processed.
Nothing to read is an error (exit status 1), named before the model loads
where it can be: no `--input`, an input path that does not exist, a folder
without image files; and after the run when not one image (or video frame)
could be read.
Video: animated GIF frames are read with Pillow and written back as a drawn
GIF plus PNG frames; other formats (mp4, ...) need `imageio[ffmpeg]`
installed (then a drawn mp4 is written too). Inputs and `--output` may be
local paths or URLs (gs://...; files.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from effdet_jax import api, files, inference
from effdet_jax.cpu import malloc_tuning

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
VIDEO_EXTENSIONS = ('.gif', '.mp4', '.avi', '.mov', '.mkv', '.webm')


def _label_map(config: Any, spec: str, checkpoint: str) -> dict[int, str]:
  """--label_map, else the one a training run saved in its workdir (the
  classes the model was trained on), else the config's data."""
  from effdet_jax.data import label_maps, sources  # noqa: PLC0415

  if spec:
    return label_maps.load(spec)
  saved = label_maps.load_workdir(checkpoint)
  if saved is not None:
    return saved.names
  if config is None:
    return {}
  try:
    return sources.label_map(config)
  except Exception as err:  # noqa: BLE001 - names are a nicety
    logging.warning('no class names from the config (%s); using ids', err)
    return {}


def list_images(path: str) -> list[str]:
  """Image files of a folder (sorted), or the one file given."""
  if files.isdir(path):
    return [
      files.join(path, f)
      for f in files.listdir(path)
      if f.lower().endswith(IMAGE_EXTENSIONS)
    ]
  return [path]


class NothingReadError(ValueError):
  """The input held no image (or video frame) that could be read."""


def check_input(path: str) -> None:
  """Raises app.UsageError for an input with nothing to read: a path that
  does not exist or a folder without image files (checked before the
  model is loaded and compiled)."""
  if not files.exists(path):
    raise app.UsageError(f'--input={path}: no such file or folder')
  if files.isdir(path) and not list_images(path):
    raise app.UsageError(
      f'--input={path}: the folder has no image files '
      f'({", ".join(IMAGE_EXTENSIONS)}); a video must be given as a file'
    )


def _video_frames(path: str) -> Iterator[np.ndarray]:
  if path.lower().endswith('.gif'):
    from PIL import Image, ImageSequence  # noqa: PLC0415

    with files.open(path, 'rb') as f, Image.open(f) as im:
      for frame in ImageSequence.Iterator(im):
        yield np.asarray(frame.convert('RGB'))
    return
  try:
    import imageio.v3 as iio  # noqa: PLC0415
  except ImportError as err:
    raise SystemExit(
      f'{path}: reading this video format needs `pip install '
      'imageio[ffmpeg]`; animated GIFs work without it'
    ) from err
  if files.is_remote(path):  # imageio's readers open local files
    ext = os.path.splitext(path)[1]
    yield from iio.imiter(files.read_bytes(path), extension=ext)
    return
  yield from iio.imiter(path)


def _save_png(array: np.ndarray, path: str) -> None:
  from PIL import Image  # noqa: PLC0415

  with files.open(path, 'wb') as f:
    Image.fromarray(array).save(f, format='PNG')


def run(
  predictor: inference.Predictor,
  input_path: str,
  output: str,
  min_score: float,
) -> dict[str, Any]:
  """Processes the input; returns a summary (counts, skipped files)."""
  files.makedirs(output)
  if input_path.lower().endswith(VIDEO_EXTENSIONS):
    return _run_video(predictor, input_path, output, min_score)
  results, skipped = [], []
  paths = list_images(input_path)
  decoded: list[tuple[str, np.ndarray]] = []

  def flush():
    if not decoded:
      return
    dets = predictor.predict_arrays([a for _, a in decoded], min_score)
    for (path, array), det in zip(decoded, dets, strict=True):
      name = os.path.basename(path)
      results.extend(det.to_coco(name))
      stem = os.path.splitext(name)[0]
      _save_png(inference.draw(array, det), files.join(output, stem + '.png'))
    decoded.clear()

  for path in paths:
    try:
      decoded.append((path, inference.read_image(path)))
    except Exception as err:  # noqa: BLE001 - a bad file must not stop us
      logging.error('skipping %s: cannot decode (%s)', path, err)
      skipped.append({'file': path, 'error': f'{type(err).__name__}: {err}'})
      continue
    if len(decoded) == predictor.batch_size:
      flush()
  flush()
  return _finish(
    output, results, skipped, len(paths) - len(skipped), input_path
  )


def _run_video(predictor, path, output, min_score) -> dict[str, Any]:
  frames_dir = files.join(output, 'frames')
  files.makedirs(frames_dir)
  results, drawn, chunk = [], [], []

  def flush():
    if not chunk:
      return
    dets = predictor.predict_arrays([f for _, f in chunk], min_score)
    for (index, frame), det in zip(chunk, dets, strict=True):
      results.extend(det.to_coco(index))
      picture = inference.draw(frame, det)
      _save_png(picture, files.join(frames_dir, f'{index:06d}.png'))
      drawn.append(picture)
    chunk.clear()

  for index, frame in enumerate(_video_frames(path)):
    chunk.append((index, np.asarray(frame)[..., :3]))
    if len(chunk) == predictor.batch_size:
      flush()
  flush()
  stem = os.path.splitext(os.path.basename(path))[0]
  if drawn:
    from PIL import Image  # noqa: PLC0415

    first, *rest = [Image.fromarray(p) for p in drawn]
    with files.open(files.join(output, stem + '.gif'), 'wb') as f:
      first.save(
        f,
        format='GIF',
        save_all=True,
        append_images=rest,
        duration=40,
        loop=0,
      )
    try:
      import imageio.v3 as iio  # noqa: PLC0415

      # Encoded in memory: imageio's writers open local files only.
      mp4 = iio.imwrite('<bytes>', np.stack(drawn), extension='.mp4', fps=25)
      files.write_bytes(files.join(output, stem + '.mp4'), mp4)
    except Exception as err:  # noqa: BLE001 - the GIF is already there
      logging.info('no mp4 written (%s); the drawn GIF and frames are', err)
  return _finish(output, results, [], len(drawn), path)


def _finish(output, results, skipped, processed, input_path) -> dict[str, Any]:
  """Writes the detections and the summary; raises NothingReadError (after
  writing them: the summary lists the files that failed) when not one
  image was read."""
  files.write_json(files.join(output, 'detections.json'), results)
  summary = {
    'processed': processed,
    'detections': len(results),
    'skipped': skipped,
  }
  files.write_json(files.join(output, 'summary.json'), summary, indent=1)
  logging.info(
    'infer: %d images, %d detections, %d skipped -> %s',
    processed,
    len(results),
    len(skipped),
    output,
  )
  if not processed:
    failed = '; '.join(f'{s["file"]}: {s["error"]}' for s in skipped[:3])
    raise NothingReadError(
      f'no image could be read from {input_path}'
      + (f' ({len(skipped)} failed to decode: {failed})' if skipped else '')
      + '; see also '
      + files.join(output, 'summary.json')
    )
  return summary


def _define_flags() -> None:
  """The program's flags; defined only when it runs as a program (absl
  flags are process-global: importing two tools into one process must not
  define --config twice)."""
  config_flags.DEFINE_config_file(
    'config', None, 'Run config (class names, NMS method); optional.'
  )
  flags.DEFINE_string(
    'checkpoint', None, 'Training workdir or converter directory.'
  )
  flags.DEFINE_string('input', None, 'An image, a folder or a video.')
  flags.DEFINE_string('output', None, 'Output folder.')
  flags.DEFINE_float('min_score', 0.4, 'Keep scores >= this.')
  flags.DEFINE_integer('max_boxes', 100, 'Detections per image.')
  flags.DEFINE_integer('batch_size', 8, 'Images per compiled call.')
  flags.DEFINE_enum(
    'dtype',
    None,
    list(api.DTYPES),
    "Compute dtype; default: the checkpoint's model config (float32 for "
    'a converted checkpoint).',
  )
  flags.DEFINE_string(
    'label_map', '', "coco | voc | shapes | a json file; '' = from --config."
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  for name in ('checkpoint', 'input', 'output'):
    if not f[name].value:
      raise app.UsageError(f'--{name} is required')
  check_input(f.input)  # before the model loads: a typo fails in seconds
  # Both before any JAX backend starts (as effdet_jax.main does), and only
  # where the 'cpu' backend computes.
  malloc_tuning.reexec_if_untuned()
  malloc_tuning.dispatch_inline()
  config = f.config
  loaded = api.load(f.checkpoint, dtype=f.dtype)
  nms_method = config.eval.nms_method if config is not None else 'gaussian'
  predictor = inference.Predictor(
    loaded[0],
    loaded[1],
    loaded.config,
    label_map=_label_map(config, f.label_map, f.checkpoint),
    max_boxes=f.max_boxes,
    nms_method=nms_method,
    batch_size=f.batch_size,
  )
  try:
    summary = run(predictor, f.input, f.output, f.min_score)
  except NothingReadError as err:
    raise SystemExit(f'infer: {err}') from None  # exit status 1
  print(json.dumps(summary))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
