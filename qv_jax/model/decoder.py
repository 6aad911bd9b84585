"""The Qwen2 / Qwen2.5 and Llama 3.x decoders (HF `Qwen2ForCausalLM` / `LlamaForCausalLM` semantics), with
scanned layers, a named remat policy and a static-shape KV cache.

Param tree (paths relative to the Decoder; N layers stacked on axis 0, logical axes in parentheses):

  embed_tokens/embedding                      [V, D]            (vocab, embed)
  layers/input_layernorm/scale                [N, D]            (layers, embed)
  layers/self_attn/q_proj/kernel              [N, D, H, hd]     (layers, embed, heads, head_dim)
  layers/self_attn/q_proj/bias                [N, H, hd]        (layers, heads, head_dim)      qkv_bias
  layers/self_attn/{k,v}_proj/kernel          [N, D, KV, hd]    (layers, embed, kv_heads, head_dim)
  layers/self_attn/{k,v}_proj/bias            [N, KV, hd]       (layers, kv_heads, head_dim)   qkv_bias
  layers/self_attn/o_proj/kernel              [N, H, hd, D]     (layers, heads, head_dim, embed)
  layers/post_attention_layernorm/scale       [N, D]            (layers, embed)
  layers/mlp/{gate,up}_proj/kernel            [N, D, F]         (layers, embed, mlp)
  layers/mlp/down_proj/kernel                 [N, F, D]         (layers, mlp, embed)
  norm/scale                                  [D]               (embed)
  lm_head/kernel                              [D, V]            (embed, vocab)   absent when tied

`layers` is one `DecoderLayer` whose params carry the leading layer axis; it is only run through
`Decoder.__call__` (lax.scan, or an unrolled loop with `scan_layers=False`), never called directly.

Masks and positions: tokens sit in slots; `mask` False marks padding slots, which are seen by no one (causal
over slots AND key validity) and whose positions are ignored. RoPE uses the explicit `positions`, so a
padded sequence gives its valid tokens the logits of the unpadded one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qv_jax.config.typed import DecoderConfig, expect
from qv_jax.layers import Dense, RMSNorm
from qv_jax.layers.stack import checkpoint_policy, scan_layers, stack_layers, unstack_layer_state
from qv_jax.model.attention import Attention
from qv_jax.model.rope import inv_frequencies, rope_tables
from qv_jax.parallel.ring_attention import from_zigzag, to_zigzag, uses_ring
from qv_jax.sharding import HIDDEN_AXES, KV_AXES, LOGIT_AXES, MLP_AXES, SLOT_AXES, constrain, param

CACHE_AXES = ("activation_layers",) + KV_AXES      # the KV cache [N, B, S, KV, hd]


class KVCache(NamedTuple):
  """Static-shape decoding state. k, v [N, B, S, KV, hd]; valid [B, S] (slot holds a real token);
  positions [B, S] (its RoPE position); index: int32 scalar, the next slot to write."""
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  positions: jax.Array
  index: jax.Array


class Embedding(nnx.Module):
  """Token embeddings [V, D] (vocab, embed)."""

  def __init__(self, vocab_size: int, features: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = param(nnx.initializers.normal(0.02), rngs.params(), (vocab_size, features),
                           ("vocab", "embed"), param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    table = self.embedding.get_value()
    ids = jnp.clip(ids, 0, table.shape[0] - 1)
    return jnp.take(table, ids, axis=0).astype(self.dtype)


class DecoderRMSNorm(RMSNorm):
  """RMSNorm with HF's rounding: normalise in fp32, cast to the input dtype, then multiply the weight."""

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)).astype(x.dtype)
    return self.scale.get_value().astype(x.dtype) * y


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) · up(x)), no biases."""

  def __init__(self, features: int, hidden: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    common = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Dense(features, hidden, axes=("embed", "mlp"), **common)
    self.up_proj = Dense(features, hidden, axes=("embed", "mlp"), **common)
    self.down_proj = Dense(hidden, features, axes=("mlp", "embed"), **common)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(constrain(h, MLP_AXES))


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    expect(cfg, DecoderConfig, "DecoderLayer")
    dtype = jnp.dtype(cfg.dtype)
    common = dict(param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.input_layernorm = DecoderRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **common)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = DecoderRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **common)
    self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, **common)

  def __call__(self, x, cos, sin, k_valid, cache_kv=None, index=0, segment_ids=None, zigzag=False):
    attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, k_valid, cache_kv, index, segment_ids,
                              zigzag)
    x = constrain(x + attn, HIDDEN_AXES)
    x = x + self.mlp(self.post_attention_layernorm(x))
    return constrain(x, HIDDEN_AXES), kv


class Decoder(nnx.Module):
  """Qwen2 / Llama 3.x causal LM over a `DecoderConfig` (`validate(config).model.decoder`), computing in
  its `dtype` with params in its `param_dtype`. Logits, softmax and norms statistics are fp32."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    expect(cfg, DecoderConfig, "Decoder")
    self.dtype = jnp.dtype(cfg.dtype)
    param_dtype = jnp.dtype(cfg.param_dtype)
    self.num_layers, self.num_kv_heads, self.head_dim = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    self.vocab_size, self.tied = cfg.vocab_size, bool(cfg.tie_embeddings)
    scaling = cfg.rope_scaling
    self.rope = (cfg.head_dim, float(cfg.rope_theta),
                 None if scaling is None else tuple(sorted(scaling.to_dict().items())))
    self.scan_layers = bool(cfg.scan_layers)
    self.remat_policy = cfg.remat_policy
    self.context_attention = cfg.context_attention
    common = dict(dtype=self.dtype, param_dtype=param_dtype)

    self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **common)

    self.layers = stack_layers(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_layers, rngs)

    self.norm = DecoderRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.lm_head = (None if self.tied else
                    Dense(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False,
                          rngs=rngs, **common))

  def embed(self, ids: jax.Array) -> jax.Array:
    """ids [B, L] int32 -> [B, L, D] in the compute dtype. Ids outside [0, V) (e.g. the -200 image
    placeholder) read row clip(id, 0, V-1); callers overwrite those slots."""
    return constrain(self.embed_tokens(ids), HIDDEN_AXES)

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache of `max_len` slots (dtype: the compute dtype unless given)."""
    shape = (self.num_layers, batch, max_len, self.num_kv_heads, self.head_dim)
    dtype = self.dtype if dtype is None else jnp.dtype(dtype)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_len), bool), positions=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    """Final-normed hidden [B, L, D] -> logits [B, L, V] fp32 (fp32 accumulation)."""
    h = hidden.astype(self.dtype)
    if self.tied:
      table = self.embed_tokens.embedding.get_value().astype(self.dtype)
      logits = jnp.einsum("bld,vd->blv", h, table, preferred_element_type=jnp.float32)
    else:
      kernel = self.lm_head.kernel.get_value().astype(self.dtype)
      logits = jnp.einsum("bld,dv->blv", h, kernel, preferred_element_type=jnp.float32)
    return constrain(logits.astype(jnp.float32), LOGIT_AXES)

  def _run_layers(self, x, cos, sin, k_valid, cache, segment_ids=None, layer_params=None, zigzag=False):
    index = 0 if cache is None else cache.index
    if layer_params is not None:
      return self._run_unstacked(nnx.graphdef(self.layers), layer_params, x, cos, sin, k_valid, cache, index,
                                 segment_ids, zigzag)

    def body(layer, h, cache_kv):
      h, kv = layer(h, cos, sin, k_valid, cache_kv, index, segment_ids, zigzag)
      return h, (kv if cache is not None else None)

    remat = self.remat_policy != "none"
    policy = checkpoint_policy(self.remat_policy)
    cache_kv = None if cache is None else (cache.k, cache.v)
    return scan_layers(self.layers, body, x, cache_kv, remat=remat, policy=policy,
                       prevent_cse=not self.scan_layers, unroll=not self.scan_layers)

  def _run_unstacked(self, graphdef, layer_params, x, cos, sin, k_valid, cache, index, segment_ids=None,
                     zigzag=False):
    """The layers unrolled over per-layer params (see `split_layers`), without slicing stacked weights."""
    if len(layer_params) != self.num_layers:
      raise ValueError(f"Decoder: {len(layer_params)} layer params for {self.num_layers} layers")
    new_kv = []
    for i, params in enumerate(layer_params):
      x, kv = nnx.merge(graphdef, params)(x, cos, sin, k_valid,
                                          None if cache is None else (cache.k[i], cache.v[i]), index,
                                          segment_ids, zigzag)
      new_kv.append(kv)
    return x, (None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new_kv))

  def __call__(self, *, input_ids: jax.Array | None = None, inputs_embeds: jax.Array | None = None,
               positions: jax.Array, mask: jax.Array, cache: KVCache | None = None,
               return_hidden: bool = False, segment_ids: jax.Array | None = None, layer_params=None
               ) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder on L new slots.

    input_ids [B, L] int32 or inputs_embeds [B, L, D]; positions [B, L] int32 (RoPE); mask [B, L] bool.
    Without a cache the L slots attend among themselves. With a cache they are written at slots
    cache.index..cache.index+L-1 (the caller keeps index + L within the cache's S slots) and attend over
    every valid cache slot up to their own; the returned cache has index + L. Returns (logits [B, L, V]
    fp32, or with return_hidden the final-normed hidden [B, L, D] in the compute dtype; cache or None).
    segment_ids [B, L] (no cache): packed rows, a token attends only to earlier tokens of its own segment.
    layer_params: per-layer param states (`split_layers`) run unrolled instead of the stacked `layers`.
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("Decoder: pass exactly one of input_ids and inputs_embeds")
    x = self.embed(input_ids) if input_ids is not None else inputs_embeds.astype(self.dtype)
    x = constrain(x, HIDDEN_AXES)
    batch, length = x.shape[:2]
    if positions.shape != (batch, length) or mask.shape != (batch, length):
      raise ValueError(f"Decoder: positions {positions.shape} and mask {mask.shape} must be "
                       f"[B, L] = {(batch, length)}")
    mask = mask.astype(bool)
    positions = jnp.where(mask, positions, 0).astype(jnp.int32)
    zigzag = uses_ring(self.context_attention, cache, length)
    if zigzag:     # ring attention's load-balanced layout, once for all layers (undone after them)
      x = to_zigzag(x, HIDDEN_AXES)
      positions, mask = (to_zigzag(a, SLOT_AXES) for a in (positions, mask))
      segment_ids = None if segment_ids is None else to_zigzag(segment_ids, SLOT_AXES)
    head_dim, theta, scaling = self.rope
    cos, sin = rope_tables(positions, inv_frequencies(head_dim, theta, None if scaling is None
                                                      else dict(scaling)), self.dtype)
    if cache is None:
      k_valid = mask
    else:
      if length > cache.k.shape[2]:
        raise ValueError(f"Decoder: {length} new slots exceed the cache's {cache.k.shape[2]}")
      k_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
    if segment_ids is not None and cache is not None:
      raise ValueError("Decoder: segment_ids (packed rows) are for training, not with a KV cache")
    x, new_kv = self._run_layers(x, cos, sin, k_valid, cache, segment_ids, layer_params, zigzag)
    if zigzag:
      x = from_zigzag(x, HIDDEN_AXES)
    if cache is not None:
      start = (0, 0, cache.index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache.k, new_kv[0].astype(cache.k.dtype), start)
      v = jax.lax.dynamic_update_slice(cache.v, new_kv[1].astype(cache.v.dtype), start)
      cache = KVCache(k=constrain(k, CACHE_AXES), v=constrain(v, CACHE_AXES), valid=k_valid,
                      positions=jax.lax.dynamic_update_slice(cache.positions, positions, (0, cache.index)),
                      index=cache.index + length)
    hidden = self.norm(x)
    return (hidden if return_hidden else self.logits_from_hidden(hidden)), cache


def split_layers(decoder: Decoder) -> tuple[Decoder, list]:
  """(the decoder with its stacked layer params replaced by empty placeholders, one param state per layer).

  Decoding runs faster with the layers unrolled over separate per-layer arrays on backends that copy
  a dynamic slice of a stacked weight before every matmul (XLA:CPU: 1.7x per step at the Qwen2.5-0.5B
  shape); pass the list as `layer_params` to every call. The stacked copy is dropped, so memory does not
  double once the caller lets go of the original decoder."""
  graphdef, state = nnx.split(decoder)
  state["layers"], per_layer = unstack_layer_state(state["layers"], decoder.num_layers)
  return nnx.merge(graphdef, state), per_layer
