"""Grouped-query self-attention of the Qwen2 / Llama 3 decoders, with explicit slot masks.

Tokens live in *slots* (a position along the sequence or the KV cache). Query slot i sees key slot j iff
j ≤ i and key j is valid (`mask` True), so padding slots are seen by no one wherever they sit. Rows that
see nothing (padding queries) get a uniform softmax over masked scores: finite, and ignored downstream.
Query head h uses KV head h // (heads / kv_heads), as HF `repeat_kv`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qv_jax.config.typed import DecoderConfig, expect
from qv_jax.model.rope import apply_rope
from qv_jax.parallel.context import context_size
from qv_jax.parallel.ring_attention import allgather_attention, ring_attention, uses_ring
from qv_jax.sharding import KV_AXES, QUERY_AXES, constrain, param

_MASKED = float(np.finfo(np.float32).min)


class HeadProjection(nnx.Module):
  """x [B, L, D] -> [B, L, n, head_dim]. kernel [D, n, head_dim] (embed, `heads_axis`, head_dim),
  optional bias [n, head_dim]."""

  def __init__(self, in_features: int, num_heads: int, head_dim: int, *, heads_axis: str, use_bias: bool,
               dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.dtype = dtype
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0,
                                             out_axis=(1, 2))
    self.kernel = param(init, rngs.params(), (in_features, num_heads, head_dim),
                        ("embed", heads_axis, "head_dim"), param_dtype)
    self.bias = (param(nnx.initializers.zeros, rngs.params(), (num_heads, head_dim),
                       (heads_axis, "head_dim"), param_dtype) if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum("bld,dnh->blnh", x.astype(self.dtype), self.kernel.get_value().astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias.get_value().astype(self.dtype)
    return y


class OutProjection(nnx.Module):
  """[B, L, heads, head_dim] -> [B, L, D]. kernel [heads, head_dim, D] (heads, head_dim, embed)."""

  def __init__(self, num_heads: int, head_dim: int, out_features: int, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    self.dtype = dtype
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1),
                                             out_axis=2)
    self.kernel = param(init, rngs.params(), (num_heads, head_dim, out_features),
                        ("heads", "head_dim", "embed"), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("blnh,nhd->bld", x.astype(self.dtype), self.kernel.get_value().astype(self.dtype))


def _attend_block(q, k, v, q_slots, k_valid, scale, q_segment=None, k_segment=None):
  """q [B, C, H, hd] at slots q_slots [C]; k, v [B, S, KV, hd]; k_valid [B, S] -> [B, C, H, hd].
  q_segment [B, C] / k_segment [B, S]: a query sees only keys of its own segment (packed rows)."""
  b, c, h, hd = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, c, kv, h // kv, hd)
  scores = jnp.einsum("bckgd,bskd->bkgcs", qg, k, preferred_element_type=jnp.float32) * scale
  causal = jnp.arange(k.shape[1], dtype=jnp.int32)[None, :] <= q_slots[:, None]      # [C, S]
  visible = causal[None, None, None] & k_valid[:, None, None, None, :]
  if q_segment is not None:
    visible = visible & (q_segment[:, :, None] == k_segment[:, None, :])[:, None, None]
  scores = jnp.where(visible, scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgcs,bskd->bckgd", probs, v)
  return out.reshape(b, c, h, hd)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array, k_valid: jax.Array, *,
           impl: str = "plain", chunk: int = 512, segment_ids: jax.Array | None = None,
           k_segment_ids: jax.Array | None = None) -> jax.Array:
  """Masked grouped-query attention, softmax in fp32 (HF eager semantics).

  q [B, L, H, hd] at slots q_slots [L] int32; k, v [B, S, KV, hd] at slots 0..S-1; k_valid [B, S] bool.
  impl "plain" holds the [B, H, L, S] scores whole; "chunked" runs `chunk` queries at a time under remat
  (exact; memory [B, H, chunk, S]). segment_ids [B, L] (L = S, no cache): block-diagonal causal attention
  for packed rows, a query sees only its own sample's keys; k_segment_ids [B, S]: the keys' own when
  L != S (default: segment_ids).
  """
  k_segment_ids = segment_ids if k_segment_ids is None else k_segment_ids
  scale = 1.0 / float(np.sqrt(q.shape[-1]))
  length = q.shape[1]
  if impl == "plain" or length <= chunk:
    return _attend_block(q, k, v, q_slots, k_valid, scale, segment_ids, k_segment_ids)
  if impl != "chunked":
    raise ValueError(f"unknown attention impl {impl!r}; expected 'plain' or 'chunked'")
  n = -(-length // chunk)
  pad = n * chunk - length
  qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  slots = jnp.pad(q_slots, (0, pad), constant_values=-1)
  qp = jnp.moveaxis(qp.reshape(q.shape[0], n, chunk, *q.shape[2:]), 1, 0)        # [n, B, C, H, hd]
  slots = slots.reshape(n, chunk)
  segments = None
  if segment_ids is not None:
    segments = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    segments = jnp.moveaxis(segments.reshape(q.shape[0], n, chunk), 1, 0)      # [n, B, C]

  @jax.checkpoint
  def block(args):
    q_chunk, slot_chunk, segment_chunk = args
    return _attend_block(q_chunk, k, v, slot_chunk, k_valid, scale, segment_chunk,
                         None if segment_chunk is None else k_segment_ids)

  out = jax.lax.map(block, (qp, slots, segments))                                          # [n, B, C, H, hd]
  out = jnp.moveaxis(out, 0, 1).reshape(q.shape[0], n * chunk, *q.shape[2:])
  return out[:, :length]


class Attention(nnx.Module):
  """Qwen2 / Llama self-attention: q/k/v projections (bias for Qwen2), RoPE on q and k, GQA, o_proj."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    expect(cfg, DecoderConfig, "Attention")
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    common = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.q_proj = HeadProjection(d, h, hd, heads_axis="heads", use_bias=cfg.qkv_bias, **common)
    self.k_proj = HeadProjection(d, kv, hd, heads_axis="kv_heads", use_bias=cfg.qkv_bias, **common)
    self.v_proj = HeadProjection(d, kv, hd, heads_axis="kv_heads", use_bias=cfg.qkv_bias, **common)
    self.o_proj = OutProjection(h, hd, d, **common)
    self.impl, self.chunk = cfg.attention_impl, int(cfg.attention_chunk)
    self.context_attention = cfg.context_attention

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, k_valid: jax.Array,
               cache_kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | int = 0,
               segment_ids: jax.Array | None = None, zigzag: bool = False
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """x [B, L, D] at slots index..index+L-1; cos/sin [B, L, hd]; k_valid [B, S] (S = L without a cache).

    cache_kv: this layer's cache (k, v) [B, S, KV, hd]; the new keys/values are written at `index`
    for this call's attention. segment_ids [B, L] (no cache): packed rows, attention never crosses
    segments. Returns (out [B, L, D], (k_new, v_new) [B, L, KV, hd]).
    With no cache and a context axis C > 1 (L a multiple of C), attention runs as a ring or over
    all-gathered K/V (`model.decoder.context_attention`, `parallel/ring_attention.py`); zigzag: x, cos,
    sin, k_valid and segment_ids are already in the ring's zig-zag layout (the Decoder arranges that
    once for all layers), else each ring call permutes.
    """
    q = constrain(apply_rope(self.q_proj(x), cos, sin), QUERY_AXES)
    k = constrain(apply_rope(self.k_proj(x), cos, sin), KV_AXES)
    v = constrain(self.v_proj(x), KV_AXES)
    q_slots = index + jnp.arange(x.shape[1], dtype=jnp.int32)
    if cache_kv is None:
      k_all, v_all = k, v
    else:
      start = (0, index, 0, 0)
      k_all = jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv[0].dtype), start)
      v_all = jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv[1].dtype), start)
      k_all, v_all = k_all.astype(q.dtype), v_all.astype(q.dtype)
    if uses_ring(self.context_attention, cache_kv, x.shape[1]):
      out = ring_attention(q, k, v, k_valid, segment_ids, zigzag=zigzag)
    elif cache_kv is None and context_size() > 1 and x.shape[1] % context_size() == 0:
      out = allgather_attention(q, k, v, k_valid, segment_ids, impl=self.impl, chunk=self.chunk)
    else:
      out = attend(q, k_all, v_all, q_slots, k_valid, impl=self.impl, chunk=self.chunk,
                   segment_ids=segment_ids)
    return self.o_proj(out), (k, v)
