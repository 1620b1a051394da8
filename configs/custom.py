"""Finetune EfficientDet on your own COCO-json dataset (any category ids).

  python -m effdet_jax.tools.inspect_data --config=configs/custom.py \\
      --config.data.train_json=TRAIN.json --config.data.train_images=DIR \\
      --config.data.eval_json=VAL.json --config.data.eval_images=DIR
  python -m effdet_jax.main --config=configs/custom.py --workdir=W \\
      --config.data.train_json=... (same data flags) \\
      --config.init_from.path=CONVERTED_DIR   # a converted official ckpt

`get_config('bccd')` fills in the README walkthrough's BCCD files
(../shared/data/bccd converted into /tmp/bccd by create_tfrecord, see the
README section "Train on your own data"); `get_config('bccd,runlocal')`
shrinks the run for a laptop smoke test. Hardware: one accelerator host for
the defaults (batch 64 as the official VOC finetune). Expected: the BCCD
benchmark (benchmarks/finetune_bccd.py: from scratch, 256 px, batch 8, 300
steps on 2 shared CPU cores) measured AP 0.027 on BCCD val; finetuning a
converted COCO checkpoint is the intended use (not measurable here).

Every knob a finetune usually touches is set below, with what it means;
everything else keeps the configs/base.py default. At start-up the run
checks the data against this config (effdet_jax/data/dataset_checks.py)
and stops with a message naming the problem: a category id not covered by
`model.num_classes` or the label map, duplicate image ids, boxes outside
their image, image files that do not exist, a label map that differs from
the one saved in the workdir (`W/label_map.json`).
"""

from effdet_jax import config_files

base = config_files.load_module('base', near=__file__)

# The BCCD walkthrough's files (README, "Train on your own data").
BCCD_DIR = '/tmp/bccd'
BCCD_IMAGES = '../shared/data/bccd/images'


def get_config(arg: str | None = None):
  args = config_files.parse_arg(arg, ('bccd', 'runlocal'), __file__)
  config = base.get_config('efficientdet-d0')
  m, d, t = config.model, config.data, config.train

  # -- data -----------------------------------------------------------------
  d.source = 'coco_json'  # or 'tfrecord' (create_tfrecord output)
  d.train_json, d.train_images = '', ''  # COCO json + its image folder
  d.eval_json, d.eval_images = '', ''
  # How the json's category ids become the model's 1-based class ids:
  #   'keep'       class id = category id (COCO 1..90 with num_classes 90,
  #                VOC 1..20 with the official num_classes 21);
  #   'contiguous' the json's categories sorted by id become 1..K (any ids:
  #                0-based, sparse, large); detections are written back
  #                with the json's ids, so COCO eval and results match it.
  d.category_ids = 'contiguous'
  # Class names. '' = the json's `categories`; or 'coco' | 'voc' | a json
  # file ({id: name} or the official {name: id}) keyed by *category id*.
  # The resolved map is saved as W/label_map.json and used by evaluation
  # and tools/infer.py; resuming or evaluating with another one stops.
  d.label_map = ''
  # Scale jitter: the image is resized by a random factor in
  # [jitter_min, jitter_max] of image_size, then cropped (official
  # 0.1..2.0; small data and short runs do better with a narrower range).
  d.jitter_min, d.jitter_max = 0.5, 1.5
  d.input_rand_hflip = True  # False for data where left/right matters
  d.autoaugment_policy = ''  # '' | v0 | v1 | v2 | v3 | randaug
  d.max_instances_per_image = 100  # more boxes per image are dropped
  d.strict = False  # True: a bad record stops the run instead of skipping

  # -- model ----------------------------------------------------------------
  # Must cover the classes: with 'contiguous' at least K, with 'keep' at
  # least the largest category id (a 0 id is never valid).
  m.num_classes = 3
  m.image_size = (512, 512)  # (H, W); multiples of 2**max_level (128)
  # Anchors: per location num_scales octaves x aspect ratios (w/h), base
  # size anchor_scale * stride (P3 stride 8 -> 32 px). inspect_data counts
  # the boxes no anchor matches; lower anchor_scale for small objects.
  m.anchor_scale = 4.0
  m.num_scales = 3
  m.aspect_ratios = (1.0, 2.0, 0.5)
  m.dtype = 'float32'  # 'bfloat16': mixed precision (f32 params, BN, loss)

  # -- training -------------------------------------------------------------
  # Official var_freeze_expr over our parameter paths; '' trains all.
  # E.g. '(efficientnet|fpn_cells|resample_p6)' trains only the heads.
  t.freeze = ''
  t.batch_size = 64  # global
  t.num_epochs = 50.0  # official VOC finetune: 50 epochs
  t.num_examples_per_epoch = 0  # 0: the size of the training json
  t.learning_rate = 0.08  # per 64 images (scaled by batch_size / 64)
  t.lr_warmup_init = 0.008
  t.lr_warmup_epoch = 1.0
  # Start from pretrained weights (a converted official checkpoint,
  # `python -m effdet_jax.convert --source=tf ...`); the workdir's own
  # checkpoint always wins (resume). kind: detector | backbone; ema: take
  # the EMA copy. A different num_classes re-initialises the class head.
  if 'init_from' in config:
    config.init_from.path = ''
  config.eval.batch_size = 8
  config.eval.every_steps = 0  # 0: at the end only

  if 'bccd' in args:
    d.train_json = f'{BCCD_DIR}/json_train.json'
    d.eval_json = f'{BCCD_DIR}/json_val.json'
    d.train_images = d.eval_images = BCCD_IMAGES
  if 'runlocal' in args:
    m.image_size = (256, 256)
    t.batch_size = config.eval.batch_size = 4
    t.num_steps = 20
    t.lr_warmup_steps = 5
    t.log_every_steps = 5
  return config
