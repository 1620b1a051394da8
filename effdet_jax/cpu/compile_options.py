"""XLA:CPU compile options for the training step.

On the CPU the step's heavy work is in prebuilt kernels (the 'cpu' ops
backend) and XLA's own kernels are the glue around them (the optimizer's
and EMA's vector loops, the loss, BN statistics, layout copies): about
2,400 small fusions whose LLVM code generation is most of the compile.
LLVM at -O1 without its expensive passes compiles the D0 step (512 px,
batch 8, 2-core CPU) in 11.8-12.8 s instead of 14.6-16.2 s, and the step
runs as fast (median 1.29-1.40 s against 1.33-1.39 s over 15 steps); the
loss after 18 steps differs in the 7th digit (instruction selection). A
user's own XLA_FLAGS for either option win; TPUs and GPUs get nothing
from here.
"""

from __future__ import annotations

import os

STEP_OPTIONS = {
  'xla_backend_optimization_level': 1,
  'xla_llvm_disable_expensive_passes': True,
}


def step_options(platform: str) -> dict[str, int | bool]:
  """Compile options for the training step on `platform` ({} off CPU);
  options the environment's XLA_FLAGS already set are left to them."""
  if platform != 'cpu':
    return {}
  flags = os.environ.get('XLA_FLAGS', '')
  return {k: v for k, v in STEP_OPTIONS.items() if f'--{k}' not in flags}
