"""Fixed sine-cosine position tables of the 3D resampler (SPEC §4).

A D-dim position code is [time 2/8 | row 3/8 | column 3/8]; each part of size d is a 1-D code
[sin(p·ω_0..ω_{d/2-1}), cos(p·ω_0..)] with ω_i = 1 / temperature^(i / (d/2)). Row = token // grid,
column = token % grid (raster order). Tables are computed in fp32 from absolute frame indices and are
never stored in checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_dims(embed_dim: int) -> tuple[int, int, int]:
  """(time, row, column) widths: D/8·2, D/8·3, D/8·3. Each must be even (so D % 16 == 0)."""
  if embed_dim % 8:
    raise ValueError(f"3D sincos needs embed_dim D % 8 == 0, got D={embed_dim}")
  unit = embed_dim // 8
  dims = (2 * unit, 3 * unit, 3 * unit)
  if any(d % 2 for d in dims):
    raise ValueError(f"3D sincos needs even part widths {dims} (D % 16 == 0), got D={embed_dim}")
  return dims


def sincos_1d(dim: int, positions: jax.Array, temperature: float = 10000.0) -> jax.Array:
  """[..., dim] fp32: all sines, then all cosines, of `positions` (any shape)."""
  half = dim // 2
  omega = 1.0 / temperature ** (jnp.arange(half, dtype=jnp.float32) / half)
  angle = jnp.asarray(positions, jnp.float32)[..., None] * omega
  return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


def sincos_3d_parts(embed_dim: int, frame_positions: jax.Array, grid_size: int,
                    temperature: float = 10000.0) -> tuple[jax.Array, jax.Array]:
  """The two factors of the table: time [F, D/4] at `frame_positions` [F] and space [grid², 3D/4]."""
  d_time, d_row, d_col = split_dims(embed_dim)
  token = jnp.arange(grid_size * grid_size)
  space = jnp.concatenate([sincos_1d(d_row, token // grid_size, temperature),
                           sincos_1d(d_col, token % grid_size, temperature)], axis=-1)
  return sincos_1d(d_time, frame_positions, temperature), space


def sincos_3d(embed_dim: int, frame_positions: jax.Array, grid_size: int,
              temperature: float = 10000.0) -> jax.Array:
  """The full table [F, grid², D] fp32 (the plain resampler and tests use it)."""
  time, space = sincos_3d_parts(embed_dim, frame_positions, grid_size, temperature)
  f, p = time.shape[0], space.shape[0]
  return jnp.concatenate([jnp.broadcast_to(time[:, None], (f, p, time.shape[-1])),
                          jnp.broadcast_to(space[None], (f, p, space.shape[-1]))], axis=-1)
