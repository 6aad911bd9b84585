"""Rotary position embeddings as in HF Qwen2 / Llama (half-split `rotate_half` layout), with the
Llama 3.x frequency scaling (HF `_compute_llama3_parameters`)."""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> np.ndarray:
  """Inverse frequencies [head_dim / 2] fp32: θ^(-2i/head_dim), then the llama3 rescaling if given.

  llama3: wavelengths longer than original_max / low_freq_factor are divided by `factor`, shorter than
  original_max / high_freq_factor are kept, and the band between is interpolated smoothly.
  """
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
  if scaling is None:
    return inv
  kind = scaling.get("type", scaling.get("rope_type"))
  if kind != "llama3":
    raise ValueError(f"rope scaling {kind!r} is not supported; expected 'llama3'")
  factor = float(scaling["factor"])
  low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
  old_len = float(scaling["original_max_position_embeddings"])
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = np.float32(2 * math.pi) / inv
  scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
  smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
  smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, dtype: Any) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, L, head_dim] in `dtype` for int positions [B, L] (angles computed in fp32)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, L, heads, head_dim] rotated by cos/sin [B, L, head_dim]: x·cos + rotate_half(x)·sin."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
