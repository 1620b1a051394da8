"""Defaults for every run config; `configs/<model>.py` files are thin deltas.

Sections: model (registry fields, overridable), data, train, eval, mesh,
checkpoint. Every field has a default here so a command-line typo
(`--config.model.fpn_num_filter=...`) is an error, not a silent default.
The data/train/eval sections hold the official defaults
(`efficientdet/hparams_config.py: default_detection_configs`; the batch
size and epoch length are the flag defaults of `efficientdet/main.py`); the
input pipeline and the trainer read them.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from effdet_jax import api
from effdet_jax.data.config import data_config


def get_config(
  model_name: str = 'efficientdet-d0',
) -> ml_collections.ConfigDict:
  """The full run config for a named model."""
  config = ml_collections.ConfigDict()
  config.model = api.model_config(model_name)

  config.data = data_config()
  config.train = ml_collections.ConfigDict(
    dict(
      batch_size=64,  # global (all hosts)
      num_steps=0,  # > 0 overrides num_epochs
      num_epochs=300.0,
      num_examples_per_epoch=120000,
      learning_rate=0.08,  # per 64 images, scaled by batch_size / 64
      lr_warmup_init=0.008,  # scaled like learning_rate (TF1)
      lr_warmup_epoch=1.0,
      lr_warmup_steps=-1,  # >= 0 overrides lr_warmup_epoch
      lr_decay_method='cosine',  # cosine | stepwise | polynomial | constant
      first_lr_drop_epoch=200.0,
      second_lr_drop_epoch=250.0,
      poly_lr_power=0.9,
      momentum=0.9,
      weight_decay=4e-5,
      clip_gradients_norm=10.0,
      moving_average_decay=0.9998,
      alpha=0.25,
      gamma=1.5,
      delta=0.1,
      box_loss_weight=50.0,
      label_smoothing=0.0,
      iou_loss_type='',  # '' | iou | giou | diou | ciou
      iou_loss_weight=1.0,
      matched_threshold=0.5,
      unmatched_threshold=0.5,
      # Official var_freeze_expr: re.match on official variable names, e.g.
      # '(efficientnet|fpn_cells|resample_p6)' (train/freeze.py).
      freeze='',
      freeze_bn_stats=False,  # True: frozen layers' BN moving stats fixed
      remat=False,  # gradient checkpointing of backbone blocks, BiFPN cells
      # What a rematerialised block keeps (jax.checkpoint_policies name):
      # nothing_saveable | dots_saveable (+ conv outputs) | everything_saveable
      remat_policy='nothing_saveable',
      skip_nonfinite=False,  # skip (and count) non-finite steps, else stop
      # Stop when a step's loss exceeds this multiple of the median of the
      # last `divergence_window` losses (train/divergence.py); 0 = off.
      divergence_factor=100.0,
      divergence_window=100,
      log_every_steps=50,
      profile_steps=0,  # > 0: a profiler window of this many steps
      seed=0,
    )
  )
  # Post-processing: the official COCO-eval settings, as
  # `efficientdet/tf2/eval.py: main` sets them (batch 8, max_nms_inputs =
  # `efficientdet/tf2/anchors.py: MAX_DETECTION_POINTS`) for
  # `efficientdet/tf2/postprocess.py: postprocess_per_class` and `nms`.
  config.eval = ml_collections.ConfigDict(
    dict(
      batch_size=8,
      every_steps=0,
      nms_mode='per_class',  # per_class (COCO eval) | global (inference)
      nms_method='gaussian',  # gaussian (soft) | hard
      nms_iou_threshold=0.5,  # hard NMS only
      nms_sigma=0.5,  # gaussian only (passed to TF's kernel as sigma / 2)
      # None: the official default of the method (gaussian 0.001, hard -inf).
      nms_score_threshold=config_dict.placeholder(float),
      max_nms_inputs=5000,  # 0: every anchor with its best class
      max_detections_per_image=100,
      # COCO evaluation (effdet_jax/evaluation).
      weights='ema',  # ema | raw | both (both: raw reported as raw/<metric>)
      backend='pycocotools',  # pycocotools | faster_coco_eval
      # Ground truth json; '' = data.eval_json (coco_json source) or built
      # from the eval batches (synthetic, tfrecord, tfds).
      annotations_json='',
      num_images=0,  # > 0: evaluate only the first N images (all hosts)
      checkpoint_step=config_dict.placeholder(int),  # --mode=eval; None: last
      draw_predictions=0,  # > 0: draw this many eval images at the end
      draw_min_score=0.4,  # score threshold of the drawn boxes
    )
  )
  # Pretrained start when the workdir has no checkpoint (train/init_from.py):
  # path = converted dir, training workdir, official TF checkpoint or .h5.
  config.init_from = ml_collections.ConfigDict(
    dict(path='', kind='detector', ema=True, allow_missing='')
  )
  config.mesh = ml_collections.ConfigDict(dict(data=-1, spatial=1))
  # JAX persistent compilation cache ('' = off): a restarted or preempted
  # run, or the next eval job, skips XLA compiles it has done before.
  config.compilation_cache = ml_collections.ConfigDict(
    dict(dir='', min_compile_time_s=1.0)
  )
  config.checkpoint = ml_collections.ConfigDict(
    dict(every_steps=1000, keep=3, best_metric='AP', keep_best=1)
  )
  return config
