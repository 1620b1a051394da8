"""Export a detector as a TF SavedModel (jax2tf), optionally TFLite.

  python -m effdet_jax.tools.export --checkpoint=DIR --output=DIR \\
      [--config=configs/demo.py] [--max_boxes=100] [--batch_size=0] \\
      [--platforms=cpu] [--tflite] [--dtype=bfloat16]

`--checkpoint` is a training workdir (its EMA weights) or a converter /
`effdet_jax.save` directory; the model config saved there is authoritative
(`--dtype`, if given, overrides only its compute dtype, as for infer).
`--config`, if given, supplies the NMS method (`eval.nms_method`), as for
`effdet_jax.tools.infer`.

The SavedModel's `serving_default` signature takes `images`: uint8
[B, H, W, 3] (any H, W; one size per call) and returns

  boxes [B, K, 4] f32    ymin, xmin, ymax, xmax in original-image pixels
  scores [B, K] f32      detection scores (soft-NMS decayed)
  classes [B, K] i32     1-based class ids
  num_detections [B] i32 the first num_detections slots are detections;
                         the rest have box 0, score 0 and class 0

with K = --max_boxes. It is `effdet_jax.predict(..., min_score=0)`: the
same preprocessing in TF ops, then the network and post-processing lowered
to StableHLO by `jax2tf` (native serialization) for `--platforms`. B is
symbolic unless `--batch_size` > 0 fixes it. The variables are tf.Variables
of the SavedModel; loading needs TensorFlow only.

TFLite (`--tflite`, experimental) converts the SavedModel with the TFLite
converter, which legalizes jax2tf's StableHLO itself. With TF 2.21 this
fails for a symbolic batch (boolean `reduce` of the post-processing) and
for `--batch_size=1` (the pointwise convs' `dot_general` becomes a 4-D
`batch_matmul`); it succeeds for a fixed `--batch_size` >= 2, but the
.tflite detections are NOT verified equal to the JAX path (on a random
model they differ by soft-NMS reordering). On failure the command writes
the SavedModel, prints the converter's reason and exits non-zero.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from effdet_jax import api, files, inference, ops
from effdet_jax.detection import anchors as anchors_lib

SIGNATURE = 'serving_default'
OUTPUT_KEYS = ('boxes', 'scores', 'classes', 'num_detections')
TFLITE_FILE = 'model.tflite'


def _preprocess_batch(images, cfg):
  """`inference.preprocess_image` for a batch of one size: the same ops
  (normalise, bilinear resize, pad bottom/right), run once on the batch
  rather than in a per-image loop, which TFLite cannot run without Flex."""
  import tensorflow as tf  # noqa: PLC0415

  from effdet_jax.data import preprocess  # noqa: PLC0415

  params = inference._params(cfg)  # noqa: SLF001
  height, width = params.image_size
  x = preprocess.normalize(images, params.mean_rgb, params.stddev_rgb)
  h, w = tf.shape(x)[1], tf.shape(x)[2]
  scale, sh, sw, _, _ = preprocess.fit_geometry(h, w, params.image_size)
  x = tf.image.resize(x, tf.stack([sh, sw]), method='bilinear', antialias=False)
  # fit_geometry never exceeds the network size, so no crop is needed.
  x = tf.image.pad_to_bounding_box(x, 0, 0, height, width)
  x = tf.reshape(x, [-1, height, width, 3])
  if params.scale_range:
    x = x * 2.0 / 255.0 - 1.0
  return x, 1.0 / scale


def build_module(
  model: Any,
  variables: Any,
  config: Any,
  *,
  max_boxes: int = 100,
  nms_method: str = 'gaussian',
  batch_size: int | None = None,
  platforms: Sequence[str] = ('cpu',),
):
  """A `tf.Module` whose `serve(images)` is the serving function.

  The network is traced (whenever TF traces `serve`) with the 'xla'
  backend of `effdet_jax.ops`: the plain forms TPUs and GPUs run, no
  custom call of the XLA:CPU kernels, which a SavedModel cannot carry.

  Args:
    model, variables: what `effdet_jax.load` / `create_model` returns.
    config: the model config (run config, model section or registry name).
    max_boxes: detection slots per image (K).
    nms_method: 'gaussian' (soft-NMS) or 'hard'.
    batch_size: a fixed batch size, or None for a symbolic one.
    platforms: jax platforms the StableHLO is lowered for ('cpu', 'cuda').
  """
  import tensorflow as tf  # noqa: PLC0415
  from jax.experimental import jax2tf  # noqa: PLC0415

  cfg = inference.model_section(config)
  anchors = anchors_lib.anchors_from_config(cfg)
  kwargs = inference.inference_postprocess_kwargs(cfg, max_boxes, nms_method)
  detect = inference.make_detect_fn(model, anchors, **kwargs)
  # The variables pytree keeps static shapes; only the batch is symbolic.
  batch = 'b' if batch_size is None else str(int(batch_size))
  detect_tf = jax2tf.convert(
    detect,
    polymorphic_shapes=[None, f'({batch}, ...)', f'({batch},)'],
    native_serialization_platforms=tuple(platforms),
    with_gradient=False,
  )

  module = tf.Module()
  # tf.Variables (not constants): saved as checkpoint data, so models past
  # the 2 GiB GraphDef limit export too.
  module.variables_tree = jax.tree_util.tree_map(
    lambda x: tf.Variable(np.asarray(x), trainable=False), variables
  )

  @tf.function(
    input_signature=[
      tf.TensorSpec([batch_size, None, None, 3], tf.uint8, name='images')
    ],
    autograph=False,
  )
  def serve(images):
    inputs, scale = _preprocess_batch(images, cfg)
    scales = tf.fill(tf.shape(images)[:1], scale)
    with ops.use_backend('xla'):  # jax2tf traces `detect` here
      det = detect_tf(module.variables_tree, inputs, scales)
    boxes, scores, classes = det[0], det[1], det[2]
    # As Predictor._select: slots with a class are detections; boxes are
    # also clipped to the picture (the official clip is to the padded
    # network input).
    valid = classes > 0
    h = tf.cast(tf.shape(images)[1], tf.float32)
    w = tf.cast(tf.shape(images)[2], tf.float32)
    boxes = tf.clip_by_value(boxes, 0.0, tf.stack([h, w, h, w]))
    return {
      'boxes': tf.where(valid[..., None], boxes, 0.0),
      'scores': tf.where(valid, scores, 0.0),
      'classes': tf.where(valid, classes, 0),
      'num_detections': tf.reduce_sum(tf.cast(valid, tf.int32), axis=1),
    }

  module.serve = serve
  return module


def export_saved_model(
  model: Any,
  variables: Any,
  config: Any,
  output: str,
  **kwargs: Any,
) -> str:
  """Writes the SavedModel to `output`; returns its path.

  `kwargs` are those of `build_module`. Also writes `export_info.json`
  (the options and the model config) next to the SavedModel files.
  """
  import tensorflow as tf  # noqa: PLC0415

  module = build_module(model, variables, config, **kwargs)
  files.makedirs(output)
  tf.saved_model.save(
    module, output, signatures={SIGNATURE: module.serve.get_concrete_function()}
  )
  cfg = inference.model_section(config)
  info = {
    'signature': SIGNATURE,
    'input': 'images: uint8 [B, H, W, 3]',
    'outputs': list(OUTPUT_KEYS),
    'options': {
      k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()
    },
    'model_config': cfg.to_dict(),
  }
  files.write_json(
    files.join(output, 'export_info.json'), info, indent=1, default=str
  )
  logging.info('export: SavedModel written to %s', output)
  return output


class TFLiteUnsupportedError(RuntimeError):
  """The SavedModel cannot be converted to TFLite."""


def export_tflite(saved_model_dir: str, path: str) -> str:
  """Converts the SavedModel to a TFLite flatbuffer at `path`.

  Experimental: the result is not verified against the JAX path. Raises
  TFLiteUnsupportedError, with the converter's reason, when the conversion
  fails (see the module docstring for when it does).
  """
  import tensorflow as tf  # noqa: PLC0415

  converter = tf.lite.TFLiteConverter.from_saved_model(
    saved_model_dir, signature_keys=[SIGNATURE]
  )
  converter.target_spec.supported_ops = [
    tf.lite.OpsSet.TFLITE_BUILTINS,
    tf.lite.OpsSet.SELECT_TF_OPS,
  ]
  try:
    flatbuffer = converter.convert()
  except Exception as err:  # noqa: BLE001 - reported with its cause
    raise TFLiteUnsupportedError(
      'TFLite export failed: the TFLite converter could not legalize the '
      'jax2tf StableHLO of this model (known with TF 2.21: a symbolic batch '
      'and --batch_size=1 fail; a fixed --batch_size >= 2 converts). Serve '
      'the SavedModel instead (TF Serving, tf.saved_model.load). Converter '
      f'said: {_first_line(err)}'
    ) from err
  files.write_bytes(path, flatbuffer)
  logging.warning(
    'export: wrote %s; TFLite detections are not verified against the JAX '
    'path (the SavedModel is)',
    path,
  )
  return path


def _first_line(err: Exception) -> str:
  text = str(err).strip()
  lines = [line for line in text.splitlines() if 'error' in line.lower()]
  return (lines[0] if lines else text.splitlines()[0] if text else '')[:500]


def _define_flags() -> None:
  """The program's flags; defined only when it runs as a program (absl
  flags are process-global: importing two tools into one process must not
  define --config twice)."""
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  config_flags.DEFINE_config_file(
    'config', None, 'Run config (NMS method); optional.'
  )
  flags.DEFINE_string(
    'checkpoint', None, 'Training workdir or converter directory.'
  )
  flags.DEFINE_string('output', None, 'SavedModel folder.')
  flags.DEFINE_integer('max_boxes', 100, 'Detections per image.')
  flags.DEFINE_integer('batch_size', 0, 'Fixed batch size; 0 = any batch size.')
  flags.DEFINE_string(
    'platforms', 'cpu', 'Comma-separated jax platforms: cpu, cuda, tpu.'
  )
  flags.DEFINE_enum(
    'dtype',
    None,
    list(api.DTYPES),
    "Compute dtype; default: the checkpoint's model config (float32 for "
    'a converted checkpoint).',
  )
  flags.DEFINE_bool(
    'tflite', False, f'Also write OUTPUT/{TFLITE_FILE} (see the docstring).'
  )


def main(argv):
  from absl import app, flags  # noqa: PLC0415

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  for name in ('checkpoint', 'output'):
    if not f[name].value:
      raise app.UsageError(f'--{name} is required')
  config = f.config
  loaded = api.load(f.checkpoint, dtype=f.dtype)
  nms_method = config.eval.nms_method if config is not None else 'gaussian'
  output = export_saved_model(
    loaded[0],
    loaded[1],
    loaded.config,
    f.output,
    max_boxes=f.max_boxes,
    nms_method=nms_method,
    batch_size=f.batch_size or None,
    platforms=tuple(p for p in f.platforms.split(',') if p),
  )
  summary = {'saved_model': output}
  if f.tflite:
    try:
      summary['tflite'] = export_tflite(output, files.join(output, TFLITE_FILE))
    except TFLiteUnsupportedError as err:
      print(json.dumps(summary))
      raise SystemExit(f'export: {err}') from err
  print(json.dumps(summary))


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
