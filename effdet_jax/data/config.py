"""Defaults of the `data` config section.

Official defaults:
`efficientdet/hparams_config.py: default_detection_configs`, as read by
`efficientdet/dataloader.py: InputReader`.

`configs/base.py` sets `config.data = data_config()`. The pipeline also reads
`config.model` (image_size, mean_rgb, stddev_rgb, scale_range, num_classes),
`config.train.batch_size` and `config.eval.batch_size` (both global,
over all hosts).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def data_config() -> ml_collections.ConfigDict:
  """The `data` section with every field set to its default."""
  return ml_collections.ConfigDict(
    dict(
      # tfrecord | tfds | coco_json | synthetic
      source='synthetic',
      # tfrecord: file patterns (comma-separated globs), official layout.
      train_pattern='',
      eval_pattern='',
      # tfds: builder name (coco/2017, voc/2007, voc/2012), data_dir, splits.
      tfds_name='coco/2017',
      tfds_data_dir='',
      tfds_train_split='train',
      tfds_eval_split='validation',
      # coco_json: annotation file + image folder (file_name relative to it).
      train_json='',
      train_images='',
      eval_json='',
      eval_images='',
      # synthetic "shapes": deterministic, generated in the pipeline.
      synthetic_train_size=2048,
      synthetic_eval_size=128,
      synthetic_num_classes=3,
      synthetic_image_size=(256, 256),  # (H, W) of the generated images
      synthetic_max_objects=4,
      # '' (from the source) | coco | voc | shapes | path to a json map.
      label_map='',
      # coco_json: 'keep' (class id = category id) | 'contiguous' (the
      # json's categories in id order -> 1..K; any ids; written back).
      category_ids='keep',
      # Stop at start-up when the data does not fit the config
      # (dataset_checks.py); False only to skip the json scan.
      check_dataset=True,
      # Official input defaults
      # (`efficientdet/hparams_config.py: default_detection_configs`).
      max_instances_per_image=100,
      input_rand_hflip=True,
      jitter_min=0.1,
      jitter_max=2.0,
      # Jitter reference size (H, W); None = model.image_size.
      target_size=config_dict.placeholder(tuple),
      autoaugment_policy='',  # '' | v0 | v1 | v2 | v3 | test | randaug
      skip_crowd_during_training=True,
      # Bad input: False = count, log and skip; True = raise, naming it.
      strict=False,
      # Training stops with an error naming the skip reasons after this many
      # unusable images in a row (e.g. every record fails a check): a
      # repeated input that skips everything would otherwise never yield.
      max_consecutive_skips=1000,
      # Pipeline mechanics.
      shuffle_buffer_size=64,  # official shuffle(64) after the interleave
      cycle_length=16,  # files read in parallel; fixed for determinism
      num_parallel_calls=-1,  # -1 = tf.data.AUTOTUNE
      prefetch_batches=2,
      deterministic=True,  # same seed -> same batches, in the same order
      seed=0,
    )
  )
