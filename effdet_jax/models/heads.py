"""Class and box nets (official `tf2/efficientdet_keras.py: ClassNet`,
`BoxNet`).

Per level, `repeats` x [separable 3x3 (bias) -> BN -> act] then a predict
separable 3x3. Conv weights are shared across levels; every (repeat, level)
pair has its **own** BatchNorm named `{prefix}-{i}-bn-{level}` with the real
level number. Initialisers: truncated variance-scaling fan_in for depthwise
and pointwise weights; the class-predict bias is -log((1 - 0.01) / 0.01).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effdet_jax import ops
from effdet_jax.models import initializers, layers

Array = jax.Array

PRIOR_PROBABILITY = 0.01


class HeadNet(nn.Module):
  """Shared-weight head over all levels; `prefix` is 'class' or 'box'."""

  prefix: str
  num_outputs: int  # anchors * classes, or anchors * 4
  num_filters: int
  repeats: int
  min_level: int
  act_type: str = 'swish'
  separable: bool = True
  survival_prob: float | None = None
  bias_init_value: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  @ops.backend_form('head_net')
  def __call__(
    self, feats: Sequence[Array], train: bool = False
  ) -> list[Array]:
    act = layers.activation(self.act_type)
    convs = [
      self._conv(self.num_filters, f'{self.prefix}-{i}')
      for i in range(self.repeats)
    ]
    predict = self._conv(
      self.num_outputs,
      f'{self.prefix}-predict',
      bias_init=initializers.Constant(self.bias_init_value),
    )
    outputs = []
    for level_id, x in enumerate(feats):
      level = self.min_level + level_id
      for i in range(self.repeats):
        skip = x
        bn = layers.batch_norm(
          train, self.dtype, f'{self.prefix}-{i}-bn-{level}', act
        )
        x = bn(convs[i](x))
        if i > 0 and self.survival_prob:
          rng = self.make_rng('dropout') if train else None
          x = layers.drop_connect(x, self.survival_prob, rng) + skip
      outputs.append(predict(x))
    return outputs

  def _conv(self, features, name, bias_init=initializers.zeros):
    if self.separable:
      return layers.SeparableConv(
        features,
        depthwise_init=layers.head_init,
        pointwise_init=layers.head_init,
        bias_init=bias_init,
        dtype=self.dtype,
        name=name,
      )
    return nn.Conv(
      features,
      (3, 3),
      padding='SAME',
      kernel_init=initializers.Normal(0.01),
      bias_init=bias_init,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name=name,
    )


def class_bias_init() -> float:
  return -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
