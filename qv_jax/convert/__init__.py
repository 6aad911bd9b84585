"""Checkpoint conversion: declarative name-mapping tables from PyTorch/HF layouts to qv-jax params."""
