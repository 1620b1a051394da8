"""What training, evaluation and `effdet_jax.load` share at run time.

* `checkpoint.py`: orbax checkpoints of a workdir (save, resume, read the
  EMA variables);
* `partitioning.py`: the ('data', 'spatial') device mesh and the shardings
  of the batch and the train state;
* `metrics.py`: metric writers (TensorBoard + metrics.jsonl) and reading
  metrics.jsonl back.

Layering: `train/` and `evaluation/` import this package, never each
other's internals; nothing here imports `train/` or `evaluation/`.
"""
