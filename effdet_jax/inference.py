"""Inference for notebooks and tools: raw images -> detections -> pictures.

    import effdet_jax
    model = effdet_jax.load('workdir')           # or create_model(...)
    dets = effdet_jax.predict(model, ['a.jpg', image_array])
    picture = effdet_jax.draw(image_array, dets[1])

Images are preprocessed as in evaluation (aspect-preserving bilinear resize
to the network size, pad bottom/right, normalise; the same TF ops as the
eval pipeline) and run through one jit-compiled forward + post-processing
per (batch size, network size); boxes come back in original-image pixels.
Post-processing is the official inference path (class-agnostic NMS, boxes
clipped to the image) with the config's NMS method, then `min_score`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from effdet_jax import api, files
from effdet_jax.detection import anchors as anchors_lib
from effdet_jax.detection import postprocess as postprocess_lib

Detections = postprocess_lib.Detections


ModelAndVariables = api.ModelAndVariables


def model_section(config: Any) -> ml_collections.ConfigDict:
  """The `model` section of a run config, a model section or a name."""
  if isinstance(config, str):
    return api.model_config(config)
  if 'model' in config:
    config = config['model']
  return ml_collections.ConfigDict(dict(config))


# -- the compiled function ---------------------------------------------------


def make_detect_fn(
  model: Any, anchors: np.ndarray, **postprocess_kwargs: Any
) -> Callable[[Any, jax.Array, jax.Array], Detections]:
  """`(variables, images, image_scale) -> Detections`, not yet jitted.

  The one forward + post-processing used by evaluation, `predict` and
  export; callers jit it once and reuse it.
  """

  def detect(variables, images, image_scale):
    class_outputs, box_outputs = model.apply(variables, images, train=False)
    return postprocess_lib.postprocess(
      class_outputs, box_outputs, anchors, image_scale, **postprocess_kwargs
    )

  return detect


def inference_postprocess_kwargs(
  cfg: Any,
  max_boxes: int = 100,
  nms_method: str = 'gaussian',
) -> dict[str, Any]:
  """Official inference post-processing: global NMS over every anchor's
  best class (max_nms_inputs 0), boxes clipped to the network input."""
  return dict(
    num_classes=int(cfg.num_classes),
    image_size=cfg.image_size,
    mode='global',
    method=nms_method,
    max_nms_inputs=0,
    max_detections=int(max_boxes),
  )


# -- host preprocessing (TF ops, as the eval pipeline) -------------------------


def preprocess_image(image: Any, cfg: Any) -> tuple[Any, Any]:
  """uint8 [h, w, 3] (tf or numpy) -> (network input [H, W, 3] f32,
  image_scale = original pixels per input pixel). Usable inside a
  tf.function (export) and eagerly."""
  import tensorflow as tf  # noqa: PLC0415

  from effdet_jax.data import preprocess  # noqa: PLC0415

  params = _params(cfg)
  image = tf.convert_to_tensor(image)
  x = preprocess.normalize(image, params.mean_rgb, params.stddev_rgb)
  h, w = tf.shape(x)[0], tf.shape(x)[1]
  scale, sh, sw, oy, ox = preprocess.fit_geometry(h, w, params.image_size)
  x = preprocess.resize_crop_pad(x, sh, sw, oy, ox, params.image_size)
  if params.scale_range:
    x = x * 2.0 / 255.0 - 1.0
  return x, 1.0 / scale


def _params(cfg: Any):
  from effdet_jax.data import preprocess  # noqa: PLC0415

  size = cfg.image_size
  size = (size, size) if isinstance(size, int) else tuple(size)
  return preprocess.Params(
    image_size=(int(size[0]), int(size[1])),
    mean_rgb=preprocess._triple(cfg.mean_rgb),  # noqa: SLF001
    stddev_rgb=preprocess._triple(cfg.stddev_rgb),  # noqa: SLF001
    scale_range=bool(cfg.get('scale_range', False)),
  )


def read_image(source: Any) -> np.ndarray:
  """A path, PIL image or array -> uint8 [h, w, 3] RGB (grey expanded)."""
  from PIL import Image  # noqa: PLC0415

  if isinstance(source, (str, os.PathLike)):  # a local path or a URL
    with files.open(source, 'rb') as f, Image.open(f) as im:
      return np.asarray(im.convert('RGB'))
  if isinstance(source, Image.Image):
    return np.asarray(source.convert('RGB'))
  array = np.asarray(source)
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.ndim != 3 or array.shape[-1] not in (3, 4):
    raise ValueError(f'expected an [h, w, 3] image, got shape {array.shape}')
  if array.dtype != np.uint8:
    array = np.clip(array, 0, 255).astype(np.uint8)
  return array[..., :3]


# -- predict -------------------------------------------------------------------


@dataclasses.dataclass
class ImageDetections:
  """Detections of one image, in its original pixels.

  boxes: [k, 4] (ymin, xmin, ymax, xmax); scores [k]; classes [k] 1-based
  ids; names [k] class names (the id as text when no label map).
  """

  boxes: np.ndarray
  scores: np.ndarray
  classes: np.ndarray
  names: list[str]

  def to_coco(self, image_id: int | str) -> list[dict[str, Any]]:
    """COCO result dicts ([x, y, w, h] boxes)."""
    out = []
    for box, score, cls in zip(
      self.boxes, self.scores, self.classes, strict=True
    ):
      y0, x0, y1, x1 = (float(v) for v in box)
      out.append(
        {
          'image_id': image_id,
          'category_id': int(cls),
          'bbox': [x0, y0, x1 - x0, y1 - y0],
          'score': float(score),
        }
      )
    return out


class Predictor:
  """Batches images, runs the compiled detector once per batch shape."""

  def __init__(
    self,
    model: Any,
    variables: Any,
    config: Any,
    *,
    label_map: Mapping[int, str] | None = None,
    max_boxes: int = 100,
    nms_method: str = 'gaussian',
    batch_size: int = 8,
  ):
    self.cfg = model_section(config)
    self.variables = variables
    self.label_map = dict(label_map or {})
    self.batch_size = int(batch_size)
    anchors = anchors_lib.anchors_from_config(self.cfg)
    kwargs = inference_postprocess_kwargs(self.cfg, max_boxes, nms_method)
    self._detect = jax.jit(make_detect_fn(model, anchors, **kwargs))

  def __call__(
    self, images: Sequence[Any], min_score: float = 0.4
  ) -> list[ImageDetections]:
    """Detections for each image (uint8 arrays, PIL images or paths)."""
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = [read_image(x) for x in images[start : start + self.batch_size]]
      out.extend(self.predict_arrays(chunk, min_score))
    return out

  def predict_arrays(
    self, images: Sequence[np.ndarray], min_score: float
  ) -> list[ImageDetections]:
    """At most `batch_size` decoded uint8 images -> their detections."""
    inputs, scales = zip(
      *(preprocess_image(x, self.cfg) for x in images), strict=True
    )
    n = len(inputs)
    batch = np.zeros((self.batch_size, *inputs[0].shape), np.float32)
    batch[:n] = np.stack([np.asarray(x) for x in inputs])
    scale = np.ones([self.batch_size], np.float32)
    scale[:n] = [float(s) for s in scales]
    # The short last batch is padded so one compiled shape serves all.
    det = jax.device_get(self._detect(self.variables, batch, scale))
    sizes = [x.shape[:2] for x in images]
    return [self._select(det, i, sizes[i], min_score) for i in range(n)]

  def _select(self, det: Detections, i: int, size, min_score: float):
    keep = (det.classes[i] > 0) & (det.scores[i] >= min_score)
    classes = np.asarray(det.classes[i][keep], np.int32)
    # The official clip is to the padded network input; boxes may reach
    # into the padding, i.e. past the picture: clip to the picture too.
    h, w = size
    limit = np.array([h, w, h, w], np.float32)
    boxes = np.clip(np.asarray(det.boxes[i][keep], np.float32), 0, limit)
    return ImageDetections(
      boxes=boxes,
      scores=np.asarray(det.scores[i][keep], np.float32),
      classes=classes,
      names=[self.label_map.get(int(c), str(int(c))) for c in classes],
    )


_CACHE: dict[str, Any] = {}


def predict(
  model_and_vars: Any,
  images: Any,
  *,
  config: Any = None,
  min_score: float = 0.4,
  max_boxes: int = 100,
  label_map: Mapping[int, str] | str | None = None,
  batch_size: int = 8,
) -> list[ImageDetections]:
  """Detections for a list of images (or one image -> a list of one).

  Args:
    model_and_vars: what `effdet_jax.load` / `create_model` returns, or a
      plain `(model, variables)` pair together with `config`.
    images: uint8 [h, w, 3] arrays, PIL images or file paths (any sizes).
    config: the model config (run config, model section or registry name);
      needed only for a plain pair.
    min_score: drop detections below this score (official drawing: 0.4).
    max_boxes: detections per image kept by NMS.
    label_map: {id: name} or a name ('coco', 'voc', 'shapes') for `names`.
    batch_size: images per compiled call (the last batch is padded).

  The compiled detector is cached per model object, so repeated calls in a
  notebook do not recompile.
  """
  from effdet_jax.data import label_maps  # noqa: PLC0415

  model, variables = model_and_vars[0], model_and_vars[1]
  if config is None:
    config = getattr(model_and_vars, 'config', None)
  if config is None:
    raise ValueError(
      'predict needs the model config: pass what effdet_jax.load / '
      'create_model returns, or config=...'
    )
  if isinstance(label_map, str):
    label_map = label_maps.load(label_map)
  single = isinstance(images, (str, os.PathLike)) or (
    isinstance(images, np.ndarray) and images.ndim == 3
  )
  images = [images] if single else list(images)
  key = (id(model), id(variables), max_boxes, batch_size)
  if _CACHE.get('key') != key:
    # One cached predictor (variables can be large); it holds references
    # to model and variables, so their ids stay unique while cached.
    _CACHE['key'] = key
    _CACHE['predictor'] = Predictor(
      model, variables, config, max_boxes=max_boxes, batch_size=batch_size
    )
  predictor = _CACHE['predictor']
  predictor.label_map = dict(label_map or {})
  return predictor(images, min_score)


# -- drawing -------------------------------------------------------------------

_PALETTE = (
  (230, 25, 75),
  (60, 180, 75),
  (0, 130, 200),
  (245, 130, 48),
  (145, 30, 180),
  (70, 240, 240),
  (240, 50, 230),
  (210, 245, 60),
  (250, 190, 190),
  (0, 128, 128),
)


def draw(
  image: Any,
  detections: ImageDetections,
  min_score: float = 0.0,
  line_width: int | None = None,
) -> np.ndarray:
  """A copy of the image (uint8 [h, w, 3]) with boxes, names and scores."""
  from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415

  picture = Image.fromarray(read_image(image).copy())
  pen = ImageDraw.Draw(picture)
  font = ImageFont.load_default()
  width = line_width or max(1, round(min(picture.size) / 200))
  for box, score, cls, name in zip(
    detections.boxes,
    detections.scores,
    detections.classes,
    detections.names,
    strict=True,
  ):
    if score < min_score:
      continue
    y0, x0, y1, x1 = (float(v) for v in box)
    colour = _PALETTE[int(cls) % len(_PALETTE)]
    pen.rectangle([x0, y0, x1, y1], outline=colour, width=width)
    label = f'{name} {score:.2f}'
    left, top, right, bottom = pen.textbbox((x0, y0), label, font=font)
    # Label above the box, or inside it when the box touches the top edge.
    dy = bottom - top + 2
    ty = y0 - dy if y0 - dy >= 0 else y0
    pen.rectangle([x0, ty, x0 + right - left + 4, ty + dy], fill=colour)
    pen.text((x0 + 2, ty + 1), label, fill=(255, 255, 255), font=font)
  return np.asarray(picture)
