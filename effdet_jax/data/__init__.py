"""Input pipelines: sources, preprocessing, augmentation, dataset tools.

Entry points: `pipeline.train_dataset(config)`, `pipeline.eval_dataset(
config)`, `pipeline.to_global(batch, sharding)`; the `data` config section
is `config.data_config()`.
"""
