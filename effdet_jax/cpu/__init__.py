"""The `cpu` backend: what makes XLA:CPU fast, behind `effdet_jax.ops`.

Nothing here is needed to read or change the model: each form computes
the function of the plain code it replaces (`ops.FORMS`), with the same
variables. Contents:

* `library.py` builds the C++ kernels (`*.cc`, `*.h`) into one shared
  library on first use and registers them as XLA:CPU custom calls; the
  `native_*.py` modules are their JAX bindings (each with its gradient).
* `layers.py`, `batch_norm.py`, `focal.py`: the layers, BN and focal loss
  in the forms XLA:CPU runs fastest (kernels where they apply: one device,
  f32; else jnp forms that XLA:CPU fuses well), and the fusions that need
  a layer to see the next one; `blocks.py` builds the model's blocks from
  them.
* `malloc_tuning.py`: glibc malloc settings for XLA:CPU processes;
  `heap_reserve.py`: the first training step's heap faulted in ahead;
  `compile_options.py`: XLA:CPU compile options of the training step.

`forms()` is what `ops.set_backend('cpu')` installs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _conv2d(plain, x, kernel, stride=1):
  from effdet_jax.cpu import layers  # noqa: PLC0415

  del plain
  return layers.dense_conv(x, kernel.astype(x.dtype), stride, 'auto')


def _depthwise_conv2d(plain, x, kernel, stride=1):
  from effdet_jax.cpu import layers  # noqa: PLC0415

  del plain
  return layers.depthwise_conv(x, kernel, stride, 'auto')


def _max_pool2d(plain, x, window, stride):
  from effdet_jax.cpu import layers  # noqa: PLC0415

  del plain
  return layers.max_pool_same(x, window, stride, 'auto')


def _batch_norm_train(plain, x, scale, bias, epsilon, act):
  from effdet_jax.cpu import batch_norm  # noqa: PLC0415

  del plain
  return batch_norm.normalize_act_train(x, scale, bias, epsilon, act)


def _focal_loss_sum(
  plain, logits, cls_ids, num_classes, alpha, gamma, scale=1.0
):
  from effdet_jax.cpu import focal  # noqa: PLC0415

  del plain
  return focal.focal_loss_sum(logits, cls_ids, num_classes, alpha, gamma, scale)


def _best_matches(plain, anchors, boxes, valid, chunk):
  from effdet_jax.cpu import native_match  # noqa: PLC0415

  if native_match.supports(boxes.dtype):
    return native_match.best_matches(anchors, boxes, valid)
  return plain(anchors, boxes, valid, chunk)


def forms() -> dict[str, Callable[..., Any]]:
  """The forms this backend gives, by `ops.FORMS` name."""
  from effdet_jax.cpu import blocks  # noqa: PLC0415

  return {
    'conv2d': _conv2d,
    'depthwise_conv2d': _depthwise_conv2d,
    'max_pool2d': _max_pool2d,
    'batch_norm_train': _batch_norm_train,
    'focal_loss_sum': _focal_loss_sum,
    'best_matches': _best_matches,
    'stem': blocks.stem,
    'mbconv_block': blocks.mbconv_block,
    'fnode': blocks.fnode,
    'head_net': blocks.head_net,
  }


def describe() -> str:
  """One line: whether the C++ kernels are built and used."""
  import jax  # noqa: PLC0415

  from effdet_jax.cpu import library  # noqa: PLC0415

  if not library.load():
    return 'C++ kernels off (not built or EFFDET_NATIVE_KERNELS=0): jnp forms'
  if library.enabled():
    return 'C++ kernels on'
  return (
    f'C++ kernels built, off on {jax.device_count()} devices (a custom call '
    'has no sharding rule): jnp forms'
  )
