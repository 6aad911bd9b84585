"""`question_select`: XComp-style question-conditioned frame selection (QC-Comp of Zhang et al., "One Token
per Highly Selective Frame").

Scoring (no trainable params of its own): every frame is resampled on its own and pooled to one token
[B, F, D] (`per_frame_tokens` → mean over the Q queries). The video is cut into segments of
`segment_frames` frames; each segment is followed by a copy of the question (its last `question_len`
prompt tokens after the video) and run through the decoder's first layers as its own sequence, so the
question only attends to that segment (local attention, positions restarting at 0: no beginning/end bias
over the whole video). A frame's score is the attention probability that the question's tokens pay to
its token, averaged over heads and question tokens and summed over `select_layers` (default: the middle
layer). The top-M valid frames are kept (M = min(select_frames, F)); the answer reads
  "pooled": one token per kept frame (M slots of 1 token, each after its frame's timestamp; no thumbnail),
  "cubes":  the cubes (cubing as `cubing`) that contain a kept frame, with the thumbnail.
Scores carry no gradient (selection is discrete): trained alone, this kind trains the resampler and
whatever the stage unfreezes through the kept tokens.

Left out: LP-Comp, XComp's learned progressive token-level compression inside the LLM layers (supervised
compression tuning that merges each frame's tokens into one token at the final layer); here the pooled
token is a fixed mean of the resampler queries, and the decoder is not tuned to compress.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qv_jax.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from qv_jax.model.compressor import Compressor, CompressorOutput
from qv_jax.model.compressors.base import (QuestionSpan, empty_thumbnail, frame_valid, no_cubing_terms,
                                           per_frame_tokens)
from qv_jax.model.compressors.score_gating import topk_mask
from qv_jax.model.rope import apply_rope, inv_frequencies, rope_tables


def question_tokens(batch: dict, length: int) -> tuple[jax.Array, jax.Array]:
  """The last `length` prompt text tokens after the video's last placeholder and before the first
  supervised label: (ids [B, length] int32, valid [B, length] bool), in order."""
  ids, valid_tok = batch["input_ids"], batch["token_valid"]
  total = ids.shape[1]
  idx = jnp.arange(total)[None, :]
  placeholder = ids == IMAGE_TOKEN_INDEX
  last_ph = jnp.max(jnp.where(placeholder & valid_tok, idx, -1), axis=1, keepdims=True)
  labels = batch.get("labels")
  first_label = (jnp.full_like(last_ph, total) if labels is None else
                 jnp.min(jnp.where(labels != IGNORE_INDEX, idx, total), axis=1, keepdims=True))
  span = valid_tok & ~placeholder & (batch["token_frame"] < 0) & (idx > last_ph) & (idx < first_label)
  from_end = jnp.cumsum(span[:, ::-1], axis=1)[:, ::-1]
  sel = span & (from_end <= length)
  order = jnp.argsort(~sel, axis=1, stable=True)
  order = jnp.pad(order, ((0, 0), (0, max(0, length - total))))[:, :length]
  valid = jnp.take_along_axis(sel, order, axis=1) & (jnp.arange(length) < total)[None, :]
  return jnp.where(valid, jnp.take_along_axis(ids, order, axis=1), 0).astype(jnp.int32), valid


def segment_layout(frame_valid_: jax.Array, question_valid: jax.Array, segment_frames: int):
  """Segment-local sequences: frame_valid [B, F], question_valid [B, Lq] -> (frame index [B, G, s+Lq]
  (-1 on question slots and padding), mask [B, G, s+Lq], positions [B, G, s+Lq]) with G = ceil(F/s)
  segments, each [its s frames | the question]; positions count the valid slots of the segment from 0."""
  b, f = frame_valid_.shape
  s = segment_frames
  g = -(-f // s)
  frames = jnp.arange(g * s).reshape(g, s)
  fv = jnp.pad(frame_valid_, ((0, 0), (0, g * s - f))).reshape(b, g, s)
  lq = question_valid.shape[1]
  mask = jnp.concatenate([fv, jnp.broadcast_to(question_valid[:, None], (b, g, lq))], axis=-1)
  index = jnp.concatenate([jnp.where(fv, frames[None], -1), jnp.full((b, g, lq), -1)], axis=-1)
  positions = jnp.where(mask, jnp.cumsum(mask, axis=-1) - 1, 0)
  return index.astype(jnp.int32), mask, positions.astype(jnp.int32)


def _attention_probs(layer, x, cos, sin, mask) -> jax.Array:
  """The layer's softmax attention [B, H, L, L] fp32 (causal over slots, padding keys masked)."""
  h = layer.input_layernorm(x)
  q = apply_rope(layer.self_attn.q_proj(h), cos, sin).astype(jnp.float32)
  k = apply_rope(layer.self_attn.k_proj(h), cos, sin).astype(jnp.float32)
  heads, kv = q.shape[2], k.shape[2]
  k = jnp.repeat(k, heads // kv, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  length = x.shape[1]
  allowed = jnp.tril(jnp.ones((length, length), bool))[None, None] & mask[:, None, None, :]
  return jax.nn.softmax(jnp.where(allowed, scores, -1e30), axis=-1)


def frame_attention_scores(decoder, frame_embeds, frame_valid_, question: QuestionSpan, *, layers,
                           segment_frames: int, layer_params=None) -> jax.Array:
  """frame_embeds [B, F, D], frame_valid [B, F] -> scores [B, F] fp32 (-inf on padded frames).
  layer_params: per-layer param states of an unstacked decoder (else the stacked `decoder.layers`)."""
  b, f, d = frame_embeds.shape
  index, mask, positions = segment_layout(frame_valid_, question.valid, segment_frames)
  g, length = index.shape[1], index.shape[2]
  s = length - question.valid.shape[1]
  frames = jnp.take_along_axis(frame_embeds, jnp.clip(index[:, :, :s], 0, f - 1).reshape(b, -1, 1), axis=1)
  x = jnp.concatenate([frames.reshape(b, g, s, d),
                       jnp.broadcast_to(question.embeds[:, None], (b, g) + question.embeds.shape[1:])], axis=2)
  x = jnp.where(mask[..., None], x, 0).reshape(b * g, length, d).astype(decoder.dtype)
  mask, positions = mask.reshape(b * g, length), positions.reshape(b * g, length)
  head_dim, theta, scaling = decoder.rope
  cos, sin = rope_tables(positions, inv_frequencies(head_dim, theta, None if scaling is None else dict(scaling)),
                         decoder.dtype)
  graphdef, state = nnx.split(decoder.layers)
  qv = mask[:, s:].astype(jnp.float32)                                      # [B·G, Lq]
  total = jnp.zeros((b * g, s), jnp.float32)
  for i in range(max(layers) + 1):
    layer = nnx.merge(graphdef, layer_params[i] if layer_params is not None
                      else jax.tree.map(lambda a: a[i], state))
    if i in layers:
      probs = _attention_probs(layer, x, cos, sin, mask).mean(1)             # [B·G, L, L]
      to_frames = probs[:, s:, :s]                                           # question rows, frame cols
      total = total + (to_frames * qv[..., None]).sum(1) / jnp.maximum(qv.sum(1, keepdims=True), 1.0)
    if i < max(layers):
      x, _ = layer(x, cos, sin, mask)
  scores = total.reshape(b, g * s)[:, :f]
  return jnp.where(frame_valid_, jax.lax.stop_gradient(scores), -jnp.inf)


def selected_layers(c) -> tuple[int, ...]:
  """The decoder layers scored; c: a `CompressorConfig` (its `decoder_layers` set by `ModelConfig`)."""
  n = int(c.decoder_layers)
  layers = tuple(int(i) for i in c.select_layers) or (n // 2,)
  for i in layers:
    if not 0 <= i < n:
      raise ValueError(f"model.compressor.select_layers: layer {i} outside the decoder's 0..{n - 1}")
  return layers


def question_context(decoder, batch: dict, compressor, layer_params=None) -> tuple[QuestionSpan, object]:
  """The question span of a batch and the scorer closing over the decoder (and its per-layer params when
  unstacked, `decoder.split_layers`)."""
  ids, valid = question_tokens(batch, compressor.question_len)
  question = QuestionSpan(embeds=jax.lax.stop_gradient(decoder.embed(ids)), valid=valid)

  def scorer(frame_embeds, valid_frames):
    return frame_attention_scores(decoder, jax.lax.stop_gradient(frame_embeds), valid_frames, question,
                                  layers=compressor.layers, segment_frames=compressor.segment_frames,
                                  layer_params=layer_params)
  return question, scorer


class QuestionSelect(Compressor):
  """The cubing module's params; no params of its own."""

  needs_question = True

  def __init__(self, config, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    c = config
    self.layers = selected_layers(c)
    self.select_frames, self.segment_frames = int(c.select_frames), int(c.segment_frames)
    self.select_tokens, self.question_len = str(c.select_tokens), int(c.question_len)

  def encode(self, inputs) -> CompressorOutput:
    if inputs.scorer is None:
      raise ValueError("question_select: the inputs carry no scorer (build them with "
                       "Quicksviewer.compressor_inputs)")
    features = inputs.features
    b, f = features.shape[:2]
    valid = frame_valid(inputs.num_frames, f)
    tokens = per_frame_tokens(self, features, valid)                         # [B, F, Q, D]
    pooled = tokens.astype(jnp.float32).mean(2).astype(self.dtype)
    scores = inputs.scorer(pooled, valid)
    kept = topk_mask(scores, valid, min(self.select_frames, f))
    diagnostics = dict(frame_scores=scores, kept_frames=kept)
    if self.select_tokens == "cubes":
      cubes = self.compress(features, inputs.num_frames, inputs.key, inputs.noise_weight, inputs.sample_ids)
      kmax = cubes.cube_mask.shape[1]
      onehot = cubes.cube_ids[:, :, None] == jnp.arange(kmax)[None, None, :]
      cube_keep = (onehot & kept[:, :, None]).any(1) & cubes.cube_mask       # [B, Kmax]
      start_keep = jnp.take_along_axis(cube_keep, cubes.cube_ids, axis=1)
      return cubes.replace(boundary=cubes.boundary * start_keep, cube_mask=cube_keep,
                           cube_tokens=jnp.where(cube_keep[:, :, None, None], cubes.cube_tokens, 0),
                           diagnostics=diagnostics)
    m = min(self.select_frames, f)
    order = jnp.argsort(~kept, axis=1, stable=True)[:, :m]                   # kept frames in time order
    count = kept.sum(1)
    slot_mask = jnp.arange(m)[None, :] < count[:, None]
    slot_tokens = jnp.take_along_axis(pooled, order[..., None], axis=1)[:, :, None, :]
    cube_ids = jnp.clip(jnp.cumsum(kept, axis=1) - 1, 0, m - 1).astype(jnp.int32)
    return CompressorOutput(
        thumbnail=empty_thumbnail(b, pooled.shape[-1], self.dtype),
        cube_tokens=jnp.where(slot_mask[:, :, None, None], slot_tokens, 0), cube_mask=slot_mask,
        cube_start=jnp.where(slot_mask, order, 0).astype(jnp.int32), cube_ids=cube_ids,
        boundary=kept.astype(jnp.float32), diagnostics=diagnostics, **no_cubing_terms(b, f))
