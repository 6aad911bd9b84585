"""`score_gating`: SCORE-style learned token gating (Wang et al., "Dynamic Token Compression for Efficient
Video Understanding through Reinforcement Learning").

Tokens: every frame is resampled on its own (`per_frame_tokens`: a one-frame cube, Q tokens [B, F, Q, D]
carrying the frame's 3D sincos position), so a kept token keeps its time and grid position, and every
frame that keeps at least one token keeps its timestamp text in the prompt (`boundary`).
State: [LN(x_{f,q}) | LN(x_{f,q} − x_{f−1,q})], the token and its inter-frame residual ("surprise");
frame 0's residual is the token itself (everything is new). Policy: LN → Dense(2D→h) → GELU → Dense(h→1),
a keep logit per token [B, F, Q]; the last bias starts at +2 (keep ≈ 88 % of tokens at the start of RL).
Keeping: `keep=None` (inference) is the deterministic global top-K over all valid tokens of the video,
K = max(1, round(keep_ratio·F·Q)) per bucket F (exactly K when the video has ≥ K valid tokens, else all);
training passes Bernoulli masks sampled from σ(logits) (`qv_jax/train/score_rl.py`). No thumbnail: the
whole visual budget is the K tokens. Choices the paper summary leaves open (written here): tokens are the
resampler's per-frame queries (this model's visual tokens), not raw SigLIP patches; the policy is an MLP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qv_jax.layers import Dense, LayerNorm
from qv_jax.model.compressor import Compressor, CompressorOutput
from qv_jax.model.compressors.base import empty_thumbnail, frame_valid, no_cubing_terms, per_frame_tokens


def budget_tokens(num_frames: int, tokens_per_frame: int, keep_ratio: float) -> int:
  """K for the bucket F: max(1, round(keep_ratio·F·Q))."""
  return max(1, int(round(keep_ratio * num_frames * tokens_per_frame)))


def surprise(tokens: jax.Array) -> jax.Array:
  """[B, F, Q, D] -> the inter-frame residual x_f − x_{f−1} (frame 0: x_0)."""
  prev = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
  return tokens - prev


def topk_mask(logits: jax.Array, valid: jax.Array, k: int) -> jax.Array:
  """Global top-k per sample: logits, valid [B, ...] -> bool [B, ...] with min(k, valid count) True."""
  b = logits.shape[0]
  flat = jnp.where(valid.reshape(b, -1), logits.reshape(b, -1).astype(jnp.float32), -jnp.inf)
  k = min(k, flat.shape[1])
  _, idx = jax.lax.top_k(flat, k)
  keep = jnp.zeros(flat.shape, bool).at[jnp.arange(b)[:, None], idx].set(True)
  return (keep & valid.reshape(b, -1)).reshape(logits.shape)


class GatePolicy(nnx.Module):
  """[B, F, Q, D] tokens -> keep logits [B, F, Q] fp32."""

  def __init__(self, dim: int, hidden: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm_token = LayerNorm(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)
    self.norm_residual = LayerNorm(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Dense(2 * dim, hidden, axes=("embed", "mlp"), **common)
    self.fc2 = Dense(hidden, 1, axes=("mlp", None), bias_init=nnx.initializers.constant(2.0), **common)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    state = jnp.concatenate([self.norm_token(tokens), self.norm_residual(surprise(tokens))], axis=-1)
    return self.fc2(jax.nn.gelu(self.fc1(state), approximate=False))[..., 0].astype(jnp.float32)


class ScoreGating(Compressor):
  """The cubing module's params (its resampler makes the per-frame tokens) plus `policy/...`."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    c = config
    self.keep_ratio = float(c.keep_ratio)
    self.policy = GatePolicy(c.embed_dim, int(c.policy_hidden), eps=float(c.mlp_layer_norm_eps),
                             dtype=self.dtype, param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)

  def gate(self, features: jax.Array, num_frames) -> tuple[jax.Array, jax.Array, jax.Array]:
    """-> (tokens [B, F, Q, D], keep logits [B, F, Q] fp32, valid [B, F, Q] bool)."""
    valid = frame_valid(num_frames, features.shape[1])
    tokens = per_frame_tokens(self, features, valid)
    logits = self.policy(jax.lax.stop_gradient(tokens))
    return tokens, logits, jnp.broadcast_to(valid[:, :, None], logits.shape)

  def budget(self, num_frames_bucket: int) -> int:
    return budget_tokens(num_frames_bucket, self.settings.num_queries, self.keep_ratio)

  def output(self, tokens, logits, valid, keep) -> CompressorOutput:
    """Slots = frames; keep [B, F, Q] bool (top-K when None)."""
    b, f, q, d = tokens.shape
    if keep is None:
      keep = topk_mask(logits, valid, self.budget(f))
    keep = keep & valid
    frame_kept = keep.any(-1)
    ids = jnp.broadcast_to(jnp.arange(f, dtype=jnp.int32), (b, f))
    return CompressorOutput(
        thumbnail=empty_thumbnail(b, d, self.dtype), cube_tokens=jnp.where(keep[..., None], tokens, 0),
        cube_mask=frame_kept, cube_start=ids, cube_ids=ids, boundary=frame_kept.astype(jnp.float32),
        token_mask=keep, diagnostics=dict(gate_logits=logits, token_valid=valid), **no_cubing_terms(b, f))

  def encode(self, inputs, keep=None) -> CompressorOutput:
    tokens, logits, valid = self.gate(inputs.features, inputs.num_frames)
    return self.output(tokens, logits, valid, keep)
