"""The cubing network (SPEC §3): momentum → aggregation Linear → token mean → MLP → logits z, the
partition helpers (cube ids, starts, masks), the thumbnail features and the auxiliary term.

Token mean and Linear commute with the (linear) momentum, so z is computed from frame means:
z = fc2(gelu(fc1(LN(agg(momentum(mean_p V)))))) with exact GELU; equal to the reference's per-token
order up to rounding. Params (paths under the Cubing module): agg/{kernel [Dv,Dv], bias},
norm/{scale, bias} [Dv], fc1/{kernel [Dv,Dv], bias}, fc2/{kernel [Dv,2], bias [2]}.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qv_jax.layers import Dense, LayerNorm


def momentum(frame_means: jax.Array, alpha: float) -> jax.Array:
  """[B, F, Dv] -> [B, F-1, Dv]: m_1 = V_1 - V_0, m_t = α(V_t - V_{t-1}) + (1-α)·m_{t-1}.

  A first-order linear recurrence, evaluated as an associative scan over affine maps (a_t, b_t)."""
  diff = frame_means[:, 1:] - frame_means[:, :-1]
  rows = diff.shape[1]
  decay = jnp.full((rows,), 1.0 - alpha, diff.dtype).at[0].set(0.0)
  gain = jnp.full((rows,), alpha, diff.dtype).at[0].set(1.0)
  a = jnp.broadcast_to(decay[None, :, None], diff.shape)
  b = gain[None, :, None] * diff

  def compose(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2

  return jax.lax.associative_scan(compose, (a, b), axis=1)[1]


class Cubing(nnx.Module):
  """Cubing logits z [B, F-1, 2] (fp32) from frame-mean features [B, F, Dv]."""

  def __init__(self, vision_dim: int, *, alpha: float, layer_norm_eps: float, dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    self.alpha = float(alpha)
    dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.agg = Dense(vision_dim, vision_dim, axes=("vision_embed", "vision_mlp"), **dense)
    self.norm = LayerNorm(vision_dim, eps=layer_norm_eps, axis_name="vision_embed",
                          param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Dense(vision_dim, vision_dim, axes=("vision_embed", "vision_mlp"), **dense)
    self.fc2 = Dense(vision_dim, 2, axes=("vision_mlp", None), **dense)

  def __call__(self, frame_means: jax.Array) -> jax.Array:
    m = momentum(frame_means.astype(jnp.float32), self.alpha)
    h = self.agg(m)
    h = self.fc1(self.norm(h))
    h = jax.nn.gelu(h.astype(jnp.float32), approximate=False).astype(h.dtype)
    return self.fc2(h).astype(jnp.float32)


def cube_partition(boundary: jax.Array, num_frames: jax.Array, max_cubes: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """From hard boundaries [B, F] (1 where a cube starts; frame 0 always 1) and N [B]:
  cube_ids [B, F] int32 (padded frames keep the last cube's id), cube_mask [B, Kmax] bool (the k+1 real
  cubes), cube_start [B, Kmax] int32 (first frame of each cube, 0 for unused cubes)."""
  frames = boundary.shape[1]
  frame = jnp.arange(frames)[None, :]
  valid = frame < num_frames[:, None]
  starts = (boundary > 0.5) & valid
  cube_ids = jnp.cumsum(starts.astype(jnp.int32), axis=1) - 1
  count = starts.sum(axis=1)
  cube = jnp.arange(max_cubes)[None, :]
  cube_mask = cube < count[:, None]
  before = (cube_ids[:, None, :] < cube[:, :, None]) & valid[:, None, :]   # [B, Kmax, F]
  cube_start = jnp.where(cube_mask, before.sum(-1), 0).astype(jnp.int32)
  return cube_ids.astype(jnp.int32), cube_mask, cube_start


def pool_tokens(features: jax.Array, pool: int) -> jax.Array:
  """[B, F, P, Dv] -> [B, F, P/pool, Dv] fp32: the mean of each `pool` consecutive raster tokens (the
  reference's AvgPool2d((9, 1)); also what the frame means and the thumbnail are computed from)."""
  b, f, p, dv = features.shape
  return features.reshape(b, f, p // pool, pool, dv).mean(axis=3, dtype=jnp.float32)


def thumbnail_features(pooled: jax.Array, weights: jax.Array) -> jax.Array:
  """Σ_t w_t·pool(V_t) / sg(Σ_t w_t): pooled [B, F, P/9, Dv] (padded frames zero), weights [B, F] (ẑ)
  -> [B, P/9, Dv] fp32. (Pooling and the frame sum commute; pooling first reads V once.)"""
  total = jax.lax.stop_gradient(weights.sum(axis=1))
  return jnp.einsum("bf,bfpd->bpd", weights.astype(jnp.float32), pooled) / total[:, None, None]


def aux_norm_loss(logits: jax.Array, row_mask: jax.Array) -> jax.Array:
  """Mean over valid rows (all samples) of ‖z‖₂ over the 2 channels; 0 when there are none."""
  sq = jnp.sum(jnp.square(logits.astype(jnp.float32)), axis=-1)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  count = row_mask.sum()
  return jnp.where(count > 0, jnp.sum(jnp.where(row_mask, norm, 0.0)) / jnp.maximum(count, 1), 0.0)
