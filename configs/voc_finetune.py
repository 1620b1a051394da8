"""Finetune a COCO-trained EfficientDet-D0 on PASCAL VOC 2012, as the
official example does.

Source: google/automl efficientdet/README.md, section "8. Finetune on
PASCAL VOC 2012 with detector COCO ckpt" (TF1 main.py, commit 3852b57):
voc_config.yaml `num_classes: 21`, `var_freeze_expr:
'(efficientnet|fpn_cells|resample_p6)'`, the 20-name label map 1..20, and
`--train_batch_size=64 --eval_batch_size=64 --eval_samples=1024
--num_examples_per_epoch=5717 --num_epochs=50 --ckpt=efficientdet-d0`
(learning rate: the default 0.08 per 64 images, warmup 1 epoch, cosine).
Background as the official: class ids are the VOC ids 1..20, class id - 1
is the output channel, so with 21 outputs the last one is never a target
(the start-up check logs it). The official TF2 tutorial
(`efficientdet/tf2/tutorial.ipynb`, `--hparams="num_classes=20,..."`) uses
20; both READMEs use 21.

  python -m effdet_jax.data.create_tfrecord --format=voc \\
      --annotations=VOCdevkit/VOC2012/Annotations \\
      --images=VOCdevkit/VOC2012/JPEGImages \\
      --split=VOCdevkit/VOC2012/ImageSets/Main/train.txt \\
      --output=tfrecord/pascal_train   # + val.txt -> tfrecord/pascal_val
  python -m effdet_jax.convert --source=tf --input=efficientdet-d0 \\
      --config=configs/d0.py --output=/tmp/d0_converted  # released ckpt
  python -m effdet_jax.main --config=configs/voc_finetune.py \\
      --workdir=/tmp/efficientdet-d0-finetune \\
      --config.init_from.path=/tmp/d0_converted

Hardware: one accelerator host, batch 64 (official: a TPU / 8 GPUs).
Expected: not measured here (no VOC and no official checkpoint can be
downloaded in this workplace).
"""

from effdet_jax import config_files

base = config_files.load_module('base', near=__file__)

VOC_FREEZE = '(efficientnet|fpn_cells|resample_p6)'  # official expression


def get_config(arg: str | None = None):
  config_files.parse_arg(arg, (), __file__)  # takes none: FILE:x fails
  config = base.get_config('efficientdet-d0')
  config.model.num_classes = 21
  d = config.data
  d.source = 'tfrecord'
  d.train_pattern = 'tfrecord/pascal_train-*.tfrecord'
  d.eval_pattern = 'tfrecord/pascal_val-*.tfrecord'
  d.label_map = 'voc'  # 1 aeroplane .. 20 tvmonitor (official order)
  config.eval.annotations_json = 'tfrecord/json_pascal_val.json'
  t = config.train
  t.freeze = VOC_FREEZE
  t.batch_size = 64
  t.num_examples_per_epoch = 5717  # VOC 2012 train
  t.num_epochs = 50.0
  t.learning_rate = 0.08  # official default (per 64 images)
  t.lr_warmup_init = 0.008
  t.lr_warmup_epoch = 1.0
  t.lr_decay_method = 'cosine'
  config.eval.batch_size = 64
  config.eval.num_images = 1024  # official --eval_samples=1024
  if 'init_from' in config:
    config.init_from.path = ''  # a converted official COCO checkpoint
  return config
