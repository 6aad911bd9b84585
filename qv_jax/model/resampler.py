"""The 3D-aware resampler (SPEC §4): 64 shared queries attend to the tokens of each cube.

out = LN_post(MHA(q = LN_q(query), key = LN_kv(x W_kv) + pos, value = LN_kv(x W_kv))) @ proj, computed
for all cubes of a batch at once with a softmax segmented by cube id, by the plain per-token form
(`resampler_plain`) or the exact fast form (`resampler_fast`), picked by `compressor.resampler_impl`.

Params (paths under the Resampler module): query [Q, D]; kv_proj/kernel [Dv, D] (no bias);
ln_q/{scale,bias}, ln_kv/{scale,bias}, ln_post/{scale,bias} [D]; q_proj, k_proj, v_proj, out_proj
/{kernel [D, D], bias [D]} (q/k/v are the thirds of MultiheadAttention's in_proj, transposed);
proj [D, D] (right-multiplied, stored as in the reference).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qv_jax.layers import Dense, LayerNorm
from qv_jax.model.resampler_fast import attend_fast
from qv_jax.model.resampler_plain import attend_plain
from qv_jax.parallel.context import context_size
from qv_jax.sharding import constrain, param

_CUBE_AXES = ("activation_batch", "activation_cubes", "activation_queries")     # [B, M, Q, ...]


class ResamplerWeights(NamedTuple):
  """The resampler's parameters as fp32 arrays (kernels [in, out])."""
  query: jax.Array
  wkv: jax.Array
  ln_q_scale: jax.Array
  ln_q_bias: jax.Array
  ln_kv_scale: jax.Array
  ln_kv_bias: jax.Array
  wq: jax.Array
  bq: jax.Array
  wk: jax.Array
  bk: jax.Array
  wv: jax.Array
  bv: jax.Array


class Resampler(nnx.Module):
  """[B, F, P, Dv] frames + a partition into K cubes -> [B, K, Q, D] tokens."""

  def __init__(self, vision_dim: int, embed_dim: int, *, num_heads: int, num_queries: int,
               grid_size: int, layer_norm_eps: float, pos_temperature: float, impl: str,
               token_chunk: int, save_scores: bool = True, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    self.num_heads, self.grid_size = num_heads, grid_size
    self.eps, self.temperature = float(layer_norm_eps), float(pos_temperature)
    self.impl, self.token_chunk, self.dtype = impl, token_chunk, dtype
    self.save_scores = bool(save_scores)
    init = nnx.initializers.truncated_normal(0.02)
    d = embed_dim
    self.query = param(nnx.initializers.zeros, rngs.params(), (num_queries, d), ("queries", "embed"),
                       param_dtype)                      # the reference initialises it to zeros
    self.kv_proj = Dense(vision_dim, d, axes=("vision_embed", "embed"), use_bias=False,
                         kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = dict(eps=layer_norm_eps, axis_name="embed", param_dtype=param_dtype, rngs=rngs)
    self.ln_q, self.ln_kv, self.ln_post = LayerNorm(d, **norm), LayerNorm(d, **norm), LayerNorm(d, **norm)
    dense = dict(kernel_init=nnx.initializers.xavier_uniform(), dtype=dtype, param_dtype=param_dtype,
                 rngs=rngs)
    self.q_proj = Dense(d, d, axes=("embed", "heads"), **dense)
    self.k_proj = Dense(d, d, axes=("embed", "heads"), **dense)
    self.v_proj = Dense(d, d, axes=("embed", "heads"), **dense)
    self.out_proj = Dense(d, d, axes=("heads", "embed"), **dense)
    scale = d ** -0.5
    self.proj = param(lambda k, s, t: scale * jax.random.normal(k, s, t), rngs.params(), (d, d),
                      ("embed", None), param_dtype)

  def weights(self) -> ResamplerWeights:
    f32 = lambda v: v.get_value().astype(jnp.float32)
    return ResamplerWeights(
        query=f32(self.query), wkv=f32(self.kv_proj.kernel),
        ln_q_scale=f32(self.ln_q.scale), ln_q_bias=f32(self.ln_q.bias),
        ln_kv_scale=f32(self.ln_kv.scale), ln_kv_bias=f32(self.ln_kv.bias),
        wq=f32(self.q_proj.kernel), bq=f32(self.q_proj.bias),
        wk=f32(self.k_proj.kernel), bk=f32(self.k_proj.bias),
        wv=f32(self.v_proj.kernel), bv=f32(self.v_proj.bias))

  def __call__(self, features: jax.Array, cube_ids: jax.Array, frame_valid: jax.Array, *,
               num_cubes: int, frame_positions: jax.Array | None = None,
               impl: str | None = None) -> jax.Array:
    """features [B, F, P, Dv]; cube_ids [B, F] int (cube of each frame; any value where invalid);
    frame_valid [B, F] bool; num_cubes K (static); frame_positions [F] absolute frame indices of the
    time position code (default arange(F)); impl overrides the configured "fast" / "plain".
    Returns [B, K, Q, D] in the compute dtype (a cube with no valid frame gives a finite, meaningless
    row; mask it)."""
    f = features.shape[1]
    if frame_positions is None:
      frame_positions = jnp.arange(f)
    impl = impl or self.impl
    kwargs = dict(num_cubes=num_cubes, num_heads=self.num_heads, grid_size=self.grid_size,
                  eps=self.eps, temperature=self.temperature, dtype=self.dtype)
    if impl == "fast":
      context = context_size()
      if f % context:
        context = 1
      attn = attend_fast(self.weights(), features, cube_ids, frame_valid, frame_positions,
                         token_chunk=self.token_chunk, save_scores=self.save_scores, context=context,
                         **kwargs)
    elif impl == "plain":
      attn = attend_plain(self.weights(), features, cube_ids, frame_valid, frame_positions, **kwargs)
    else:
      raise ValueError(f"resampler impl {impl!r}; expected 'fast' or 'plain'")
    attn = constrain(attn.astype(self.dtype), _CUBE_AXES + ("activation_heads",))
    out = self.ln_post(self.out_proj(attn))
    out = jnp.matmul(out, self.proj.get_value().astype(self.dtype))
    return constrain(out, _CUBE_AXES + ("activation_embed",))
