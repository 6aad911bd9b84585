"""Generic layers shared by the vision tower, the compressor and the decoder."""

from qv_jax.layers.linear import Dense
from qv_jax.layers.norms import LayerNorm, RMSNorm

__all__ = ["Dense", "LayerNorm", "RMSNorm"]
