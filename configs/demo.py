"""Demo: a small EfficientDet-D0 trained from scratch on synthetic shapes.

  python -m effdet_jax.main --config=configs/demo.py --workdir=/tmp/demo

Hardware: 2 CPU cores. Expected: trains, evaluates (COCO AP on the held-out
shapes split) and writes drawn predictions into the workdir in <= 10 min.
`get_config('test')` shrinks it further for the test suite.
"""

from effdet_jax import config_files

base = config_files.load_module('base', near=__file__)


def get_config(arg: str | None = None):
  args = config_files.parse_arg(arg, ('test',), __file__)
  config = base.get_config('efficientdet-d0')
  m = config.model
  m.image_size = (128, 128)
  m.num_classes = 3
  d = config.data
  d.source = 'synthetic'
  d.synthetic_num_classes = 3
  d.synthetic_image_size = (128, 128)
  d.synthetic_train_size = 4096
  d.synthetic_eval_size = 128
  d.label_map = 'shapes'
  d.jitter_min, d.jitter_max = 0.8, 1.2
  t = config.train
  t.batch_size = 16
  t.num_steps = 420
  t.learning_rate = 0.16  # per 64 images -> 0.04 at batch 16
  t.lr_warmup_init = 0.016
  t.lr_warmup_steps = 50
  # A 420-step run: the official cosine (raw step over total - warmup)
  # would spend its last third near 0; EMA does the averaging instead.
  t.lr_decay_method = 'constant'
  t.moving_average_decay = 0.998  # short run: a shorter EMA horizon
  t.log_every_steps = 50
  config.checkpoint.every_steps = 210
  config.eval.every_steps = 210
  config.eval.batch_size = 16
  config.eval.draw_predictions = 16
  # A 7-minute focal-loss detector is right but not yet confident.
  config.eval.draw_min_score = 0.1
  if 'test' in args:  # seconds, for the test suite
    m.name, m.backbone_name = 'efficientdet-tiny', 'efficientnet-b0-tiny'
    m.fpn_num_filters, m.fpn_cell_repeats, m.box_class_repeats = 16, 1, 1
    d.synthetic_train_size, d.synthetic_eval_size = 64, 8
    t.batch_size = config.eval.batch_size = 4
    t.num_steps = 6
    t.lr_warmup_steps = 2
    t.log_every_steps = 1
    config.checkpoint.every_steps = 3
    config.eval.every_steps = 0
    config.eval.draw_predictions = 0  # 13 s per run (a detect compile)
  return config
