"""Converters from official / third-party weights to our variables."""

from effdet_jax.convert.effdet_torch import convert_effdet_state_dict
from effdet_jax.convert.tf_checkpoint import convert_tf_checkpoint

__all__ = ['convert_effdet_state_dict', 'convert_tf_checkpoint']
