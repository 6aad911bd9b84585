"""SCORE-style policy training for the `score_gating` compressor: group rollouts, accuracy–sparsity reward,
split advantage. The tower, resampler and decoder only score rollouts (no gradient reaches them); train
with `train.trainable_override=("policy",)` so only `compressor/policy` has optimizer state.

Per sample and step: the reference CE with every valid token kept, then G = `train.score_rollouts`
Bernoulli keep masks m_g ~ σ(logits) (tokens of padded frames never kept), each scored by the decoder's
CE with that mask (the tokens compacted out of the prompt, exactly as at inference). With
Δ_g = CE_ref + τ − CE_g (τ = `train.score_ce_tolerance`, nats) and sparsity s_g = 1 − kept/valid:
  safe rollouts (Δ_g > 0) are ranked by sparsity: A_g = (s_g − mean_safe s) / (std_safe s + 1e-6);
  violating rollouts (Δ_g ≤ 0) get a sparsity-weighted penalty A_g = −s_g (sparser and worse: pushed
  hardest back towards keeping tokens).
Loss = −mean_{g,b} A_g · log π(m_g) / valid tokens (REINFORCE over the factorised Bernoulli policy).
These formulas are this project's reading of the paper summary (Δ sign convention as in its Fig. 3).

Curriculum (`train.score_curriculum`): "pseudo_videos" replaces every video by a static pseudo-video of
its own stills, frame f showing frame ⌊f/r⌋·r (r = `train.score_repeat`): near-zero residuals inside a
still and sharp changes between stills, the paper's warm-up signal; then "videos" (the data as is). The
paper repeats distinct images and concatenates their captions; that needs an image-caption data source
and is left to the data pipeline.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qv_jax.batch import MODALITY_VIDEO
from qv_jax.train.loss import chunked_cross_entropy, supervised_count
from qv_jax.train.schedules import learning_rate_schedule
from qv_jax.train.state import TrainState


def split_advantage(delta: jax.Array, sparsity: jax.Array, eps: float = 1e-6) -> jax.Array:
  """delta, sparsity [G, B] (group axis first) -> advantages [G, B] fp32."""
  safe = delta > 0
  w = safe.astype(jnp.float32)
  n = jnp.maximum(w.sum(0), 1.0)
  mean = (sparsity * w).sum(0) / n
  std = jnp.sqrt((jnp.square(sparsity - mean) * w).sum(0) / n)
  return jnp.where(safe, (sparsity - mean) / (std + eps), -sparsity).astype(jnp.float32)


def bernoulli_log_prob(logits: jax.Array, keep: jax.Array, valid: jax.Array) -> jax.Array:
  """Σ over valid tokens of log π(keep) / valid count: logits, keep, valid [B, F, Q] -> [B]."""
  lp = jnp.where(keep, jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits))
  axes = tuple(range(1, logits.ndim))
  return jnp.where(valid, lp, 0).sum(axes) / jnp.maximum(valid.sum(axes), 1)


def pseudo_video(frames: jax.Array, repeat: int) -> jax.Array:
  """frames [B, F, ...] -> frame f shows frame ⌊f/repeat⌋·repeat (repeat 1: unchanged)."""
  if repeat <= 1:
    return frames
  return frames[:, (jnp.arange(frames.shape[1]) // repeat) * repeat]


def make_score_train_step(graphdef, config, tx: optax.GradientTransformation):
  """-> step(state, batch) -> (state, metrics) with the trainer's metric keys plus keep_rate, safe_rate,
  ce_reference."""
  t = config.train
  rollouts = int(t.score_rollouts)
  tolerance = float(t.score_ce_tolerance)
  lr_schedule = learning_rate_schedule(t)
  max_frames = max(int(f) for f in config.data.frame_buckets)
  chunk = int(t.ce_chunk)
  repeat = int(t.score_repeat) if t.score_curriculum == "pseudo_videos" else 1

  def sample_ce(model, batch, features, tokens, logits, valid, keep):
    out = model.compressor.output(tokens, logits, valid, keep)
    merged = model.assemble_inputs(batch, features, out, encode_images=bool(t.encode_images))
    hidden, _ = model.decoder(inputs_embeds=merged.embeds, positions=merged.positions, mask=merged.mask,
                              return_hidden=True)
    ce_sum, count = chunked_cross_entropy(hidden, merged.labels, model.decoder.logits_from_hidden, chunk)
    return ce_sum / jnp.maximum(count, 1.0), count, merged

  def loss_fn(params, frozen, batch, key):
    model = nnx.merge(graphdef, params, frozen)
    features = jax.lax.stop_gradient(model.frame_features(pseudo_video(batch["frames"], repeat)))
    inputs = model.compressor_inputs(batch, features, key=None, noise_weight=0.0)
    tokens, logits, valid = model.compressor.gate(features, inputs.num_frames)
    tokens = jax.lax.stop_gradient(tokens)
    is_video = (batch["modality"] == MODALITY_VIDEO)
    ce_ref, count, merged = sample_ce(model, batch, features, tokens, logits, valid, valid)
    probs = jax.nn.sigmoid(jax.lax.stop_gradient(logits))
    keeps = jax.random.bernoulli(key, probs, (rollouts,) + probs.shape) & valid[None]
    ce_g = jax.lax.map(lambda k: sample_ce(model, batch, features, tokens, logits, valid, k)[0], keeps)
    ce_g, ce_ref = jax.lax.stop_gradient(ce_g), jax.lax.stop_gradient(ce_ref)
    n_valid = jnp.maximum(valid.sum((1, 2)), 1)
    sparsity = 1.0 - keeps.sum((2, 3)) / n_valid[None]
    delta = ce_ref[None] + tolerance - ce_g
    adv = split_advantage(delta, sparsity) * is_video[None]
    logp = jax.vmap(lambda k: bernoulli_log_prob(logits, k, valid))(keeps)          # [G, B]
    loss = -(adv * logp).mean()
    videos = jnp.maximum(is_video.sum(), 1)
    stats = dict(ce=(ce_g.mean(0) * is_video).sum() / videos, ce_reference=(ce_ref * is_video).sum() / videos,
                 keep_rate=((1.0 - sparsity).mean(0) * is_video).sum() / videos,
                 safe_rate=((delta > 0).mean(0) * is_video).sum() / videos,
                 sample_ce=ce_ref, merged_tokens=merged.mask.sum(), decoder_slots=jnp.asarray(merged.mask.size, jnp.float32),
                 truncated=merged.truncated.sum())
    return loss, stats

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict[str, Any]]:
    key = jax.random.fold_in(state.rng, state.step)
    (loss, stats), grads = grad_fn(state.params, state.frozen, batch, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(
        loss=loss, ce=stats["ce"], aux=jnp.zeros((), jnp.float32), eta=jnp.zeros((), jnp.float32),
        learning_rate=lr_schedule(state.step), grad_norm=optax.tree.norm(grads),
        supervised_tokens=supervised_count(batch["labels"]).sum(), merged_tokens=stats["merged_tokens"],
        padding_fraction=1.0 - stats["merged_tokens"] / stats["decoder_slots"],
        truncated_tokens=stats["truncated"], cube_length_hist=jnp.zeros((max_frames + 1,), jnp.int32),
        sample_ce=stats["sample_ce"], sample_id=batch["sample_id"], keep_rate=stats["keep_rate"],
        safe_rate=stats["safe_rate"], ce_reference=stats["ce_reference"])
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step
