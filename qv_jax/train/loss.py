"""Losses (SPEC §6): causal-LM cross-entropy in fp32 after the one-token shift, computed over sequence
chunks so [B, S, V] logits never exist at once, and the cubing auxiliary term mean‖z‖₂ over video rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qv_jax.batch import IGNORE_INDEX


def shifted_targets(labels: jax.Array) -> jax.Array:
  """[B, S] labels -> [B, S] targets: position s predicts labels[s + 1]; the last position predicts nothing."""
  pad = jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
  return jnp.concatenate([labels[:, 1:], pad], axis=1)


def chunked_cross_entropy(hidden: jax.Array, labels: jax.Array, logits_fn, chunk: int,
                          segment_ids: jax.Array | None = None, num_segments: int = 1):
  """Sum of token cross-entropies per sample, and the supervised token count per sample.

  hidden [B, S, D] (final-normed); labels [B, S] (unshifted, IGNORE_INDEX where unsupervised);
  logits_fn: [B, c, D] -> [B, c, V] fp32. The sequence is cut into chunks of `chunk` positions (padded to a
  multiple); each chunk's logits are recomputed in the backward pass (remat). Returns (ce_sum [B], count [B]),
  or with segment_ids [B, S] (packed rows) per segment: ([B, num_segments], [B, num_segments]).
  """
  b, s, d = hidden.shape
  targets = shifted_targets(labels)
  segments = jnp.zeros((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  chunk = max(1, min(int(chunk), s))
  n = -(-s // chunk)
  pad = n * chunk - s
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    segments = jnp.pad(segments, ((0, 0), (0, pad)), constant_values=-1)
  hidden = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
  targets = targets.reshape(b, n, chunk).swapaxes(0, 1)
  segments = segments.reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(h, t, seg):
    logits = logits_fn(h).astype(jnp.float32)
    valid = t != IGNORE_INDEX
    safe = jnp.where(valid, t, 0)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    onehot = (seg[..., None] == jnp.arange(num_segments)[None, None, :]) & valid[..., None]
    ce = jnp.einsum("bc,bcp->bp", jnp.where(valid, nll, 0.0), onehot.astype(nll.dtype))
    return ce, onehot.sum(1).astype(jnp.float32)

  def body(carry, xs):
    ce, cnt = one(*xs)
    return (carry[0] + ce, carry[1] + cnt), None

  zeros = jnp.zeros((b, num_segments), jnp.float32)
  (ce_sum, count), _ = jax.lax.scan(body, (zeros, zeros), (hidden, targets, segments))
  return (ce_sum[:, 0], count[:, 0]) if segment_ids is None else (ce_sum, count)


def supervised_count(labels: jax.Array) -> jax.Array:
  """Supervised targets after the shift, per sample: labels[:, 1:] != IGNORE_INDEX. On the pre-merge
  labels this equals the merged count (dropped and visual tokens are never supervised) unless the merged
  sequence was truncated."""
  return (labels[:, 1:] != IGNORE_INDEX).sum(-1).astype(jnp.float32)


def cubing_aux_per_sample(logits: jax.Array, logit_mask: jax.Array, is_video: jax.Array) -> jax.Array:
  """Per sample, the mean over its valid rows of ‖z‖₂ (0 for image samples). logits [B, F-1, 2];
  logit_mask [B, F-1]; is_video [B]. The step sums it over the batch and divides by all its samples (the
  reference's per-device mean with one sample per device, averaged over devices by data parallelism), or
  by its video samples with train.aux_normalization="video_samples"."""
  rows = logit_mask & is_video[:, None]
  norms = jnp.sqrt(jnp.sum(jnp.square(logits.astype(jnp.float32)), axis=-1) + 1e-12)
  per_sample = jnp.where(rows, norms, 0.0).sum(-1) / jnp.maximum(rows.sum(-1), 1)
  return jnp.where(is_video, per_sample, 0.0)
