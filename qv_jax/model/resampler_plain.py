"""The plain resampler attention: per-token keys and values, softmax segmented by cube id.

The readable statement of the maths (and the reference for the fast form): for every token t of frame f
kv_t = LN_kv(x_t W_kv), K_t = (kv_t + pos_t) W_k + b_k, V_t = kv_t W_v + b_v; each query attends, per
head, to the tokens of its cube only. The segment softmax runs in two levels: per frame (max and sums
over the P tokens), then per cube (segment max / sum over frames).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qv_jax.layers.norms import layer_norm
from qv_jax.model.sincos import sincos_3d


def scaled_queries(w, num_heads: int, eps: float) -> jax.Array:
  """q = (LN_q(query) W_q + b_q) / √d_h, fp32 [Q, H, d_h]."""
  q = layer_norm(w.query.astype(jnp.float32), w.ln_q_scale, w.ln_q_bias, eps)
  q = q @ w.wq + w.bq
  d = q.shape[-1]
  return q.reshape(q.shape[0], num_heads, d // num_heads) * (d // num_heads) ** -0.5


@functools.partial(jax.jit, static_argnames=("num_cubes", "num_heads", "grid_size", "eps", "temperature",
                                             "dtype"))
def attend_plain(w, x: jax.Array, cube_ids: jax.Array, frame_valid: jax.Array,
                 frame_positions: jax.Array, *, num_cubes: int, num_heads: int, grid_size: int,
                 eps: float, temperature: float, dtype) -> jax.Array:
  """Multi-head attention output (before out_proj) of each cube: [B, K, Q, D] fp32.

  w: ResamplerWeights; x [B, F, P, Dv]; cube_ids [B, F] int; frame_valid [B, F] bool;
  frame_positions [F] absolute frame indices (time position code)."""
  b, f, p, _ = x.shape
  d = w.wkv.shape[1]
  h, dh = num_heads, d // num_heads
  x = jnp.where(frame_valid[:, :, None, None], x, 0).astype(dtype)
  kv = jnp.einsum("bfpv,vd->bfpd", x, w.wkv.astype(dtype))
  kv = layer_norm(kv, w.ln_kv_scale, w.ln_kv_bias, eps)
  pos = sincos_3d(d, frame_positions, grid_size, temperature).astype(dtype)
  keys = jnp.einsum("bfpd,de->bfpe", kv + pos, w.wk.astype(dtype)) + w.bk.astype(dtype)
  values = jnp.einsum("bfpd,de->bfpe", kv, w.wv.astype(dtype)) + w.bv.astype(dtype)
  keys = keys.reshape(b, f, p, h, dh)
  values = values.reshape(b, f, p, h, dh)
  q = scaled_queries(w, num_heads, eps).astype(dtype)

  scores = jnp.einsum("qhe,bfphe->bfhqp", q, keys, preferred_element_type=jnp.float32)
  ids = jnp.where(frame_valid, cube_ids, num_cubes)                 # padded frames: no cube
  frame_max = jax.lax.stop_gradient(scores.max(-1))                 # [B, F, H, Q]; a shift only
  cube_max = jax.vmap(lambda m, i: jax.ops.segment_max(m, i, num_cubes))(frame_max, ids)
  cube_max = jnp.where(jnp.isfinite(cube_max), cube_max, 0.0)       # cubes with no valid frame
  own_max = jax.vmap(lambda m, i: m[i])(cube_max, jnp.minimum(ids, num_cubes - 1))
  weights = jnp.where(frame_valid[:, :, None, None, None], jnp.exp(scores - own_max[..., None]), 0.0)
  frame_sum = weights.sum(-1)                                       # [B, F, H, Q]
  frame_out = jnp.einsum("bfhqp,bfphe->bfhqe", weights.astype(dtype), values,
                         preferred_element_type=jnp.float32)
  segment_sum = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_cubes))
  total = segment_sum(frame_sum, ids)                               # [B, K, H, Q]
  out = segment_sum(frame_out, ids) / jnp.where(total > 0, total, 1.0)[..., None]
  return out.transpose(0, 1, 3, 2, 4).reshape(b, num_cubes, -1, d)
