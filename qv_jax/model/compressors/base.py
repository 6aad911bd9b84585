"""The compressor contract: what a video compressor receives and what the sequence assembly reads from it.

Inputs (`CompressorInputs`), all static-shaped for the frame bucket F:
  features [B, F, P, Dv]   tower features of every frame (padded frames may hold anything)
  num_frames [B] int32     valid frames N_b (2 ≤ N_b ≤ F)
  key, noise_weight         the step's PRNG key (None: deterministic) and Gumbel weight η
  sample_ids [B]            fold per-sample keys
  question                  `QuestionSpan` (embeds [B, Lq, D], valid [B, Lq]) for kinds with
                            `needs_question`; None otherwise
  scorer                    for question-conditioned kinds: pooled frame embeds [B, F, D] + frame_valid
                            [B, F] -> frame scores [B, F] (the decoder's attention, built by the model)

Output: `qv_jax.model.compressor.CompressorOutput`, read by `assembly.plan_sequence`:
  thumbnail [B, T, D]              T may be 0 (no thumbnail)
  cube_tokens [B, K, Q, D]         K token slots of Q tokens each (a cube, a frame, or a pooled frame)
  cube_mask [B, K]                 real slots
  token_mask [B, K, Q] or None     kept tokens inside the slots (None: all); dropped ones are compacted
                                   out of the decoder sequence, so the prompt length follows the budget
  boundary [B, F]                  > 0.5 where a slot starts: that frame's timestamp and placeholder are
                                   kept and expand into slot cube_ids[frame]
  cube_ids [B, F], cube_start [B, K]
  logits [B, F-1, 2], logit_mask, aux_loss   the cubing auxiliary term (zeros / False / 0 for other kinds)
  diagnostics                      kind-specific arrays (never read by the assembly)

Adding a compressor: a module with a class built as `Cls(CompressorConfig, rngs=)` exposing `encode(inputs)`,
`encode_images(features)` and `needs_question`, plus one line in `registry.KINDS`.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp

from qv_jax.model.compressor import CompressorOutput


@flax.struct.dataclass
class QuestionSpan:
  embeds: jax.Array     # [B, Lq, D] decoder input embeddings of the question tokens
  valid: jax.Array      # [B, Lq] bool


@dataclasses.dataclass
class CompressorInputs:
  features: jax.Array
  num_frames: jax.Array
  key: jax.Array | None = None
  noise_weight: jax.Array | float = 0.0
  sample_ids: jax.Array | None = None
  question: QuestionSpan | None = None
  scorer: object = None


def frame_valid(num_frames, f: int) -> jax.Array:
  """[B, F] bool for the bucket F (num_frames clipped to 2..F as in cubing)."""
  n = jnp.clip(jnp.asarray(num_frames, jnp.int32), 2, f)
  return jnp.arange(f)[None, :] < n[:, None]


def per_frame_tokens(compressor, features, valid) -> jax.Array:
  """Every frame resampled on its own (a one-frame cube at its absolute time position):
  features [B, F, P, Dv] -> [B, F, Q, D] in the compute dtype (padded frames zero)."""
  f = features.shape[1]
  ids = jnp.broadcast_to(jnp.arange(f, dtype=jnp.int32), valid.shape)
  tokens = compressor.resampler(features.astype(compressor.dtype), ids, valid, num_cubes=f)
  return jnp.where(valid[:, :, None, None], tokens, 0).astype(compressor.dtype)


def no_cubing_terms(b: int, f: int) -> dict:
  """The cubing-only output fields for kinds without a cubing network (aux term 0)."""
  return dict(logits=jnp.zeros((b, f - 1, 2), jnp.float32), logit_mask=jnp.zeros((b, f - 1), bool),
              aux_loss=jnp.zeros((), jnp.float32))


def empty_thumbnail(b: int, d: int, dtype) -> jax.Array:
  return jnp.zeros((b, 0, d), dtype)


__all__ = ["CompressorInputs", "CompressorOutput", "QuestionSpan", "frame_valid", "per_frame_tokens",
           "no_cubing_terms", "empty_thumbnail"]
