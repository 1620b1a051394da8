"""Runs 3 tiny train steps, as one of several processes or alone.

  python tests/multiprocess_worker.py OUT.npz [PROCESS_ID NUM_PROCESSES PORT]

With process arguments it joins a localhost `jax.distributed` cluster (CPU
collectives via gloo) and feeds only its slice of each global batch through
`jax.make_array_from_process_local_data`; alone it feeds whole batches.
Process 0 (or the lone process) writes the final params and batch_stats.
"""

import sys
import tempfile

import jax
import numpy as np

if len(sys.argv) > 2:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=f'localhost:{sys.argv[4]}',
    num_processes=int(sys.argv[3]),
    process_id=int(sys.argv[2]),
  )

from flax import traverse_util  # noqa: E402
from train_utils import fixed_batch, tiny_config  # noqa: E402

from effdet_jax.runtime import partitioning  # noqa: E402
from effdet_jax.train.trainer import Trainer  # noqa: E402


def _local(x):
  return x if isinstance(x, np.ndarray) else x.addressable_data(0)


def main():
  config = tiny_config(batch_size=8)
  tr = Trainer(config, tempfile.mkdtemp())
  state = tr.fresh_state()
  # A host copy: the step donates (deletes) the state it is given.
  init = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
  pi, pc = jax.process_index(), jax.process_count()
  rows = slice(pi * 8 // pc, (pi + 1) * 8 // pc)
  step = None
  for i in range(3):
    batch = fixed_batch(config, seed=i)
    sh = tr.batch_sharding(batch)
    g = {
      k: jax.make_array_from_process_local_data(sh[k], v[rows])
      for k, v in batch.items()
    }
    if step is None:  # every process compiled before the first collective
      # The step the trainer runs, on its packed state.
      state = tr.to_loop(state)
      step = tr.loop_step_fn(g).lower(state, g).compile()
      partitioning.wait_for_all_processes('worker step compiled')
    state, _ = step(state, g)
  # Every process waits for its steps (they hold collectives): one that
  # exited after dispatching them would leave the others' steps hanging.
  jax.block_until_ready(state)
  state = tr.from_loop(state)
  if pi == 0:
    out = {}
    trees = {
      'init': init,
      'params': state.params,
      'batch_stats': state.batch_stats,
    }
    for name, tree in trees.items():
      flat = traverse_util.flatten_dict(
        jax.tree.map(lambda x: np.asarray(_local(x)), tree)
      )
      out.update({name + '/' + '/'.join(k): v for k, v in flat.items()})
    np.savez(sys.argv[1], **out)


if __name__ == '__main__':
  main()
