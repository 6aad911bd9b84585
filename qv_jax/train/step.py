"""The jitted train step: forward (vision → cubing → assembly → decoder), loss, gradients of the trainable
parameters with gradient accumulation, one optimizer update. A pure function of (state, batch).

Loss = Σ CE over the whole step's supervised tokens / their count (a global token mean across the batch,
the devices and the accumulation micro-batches; in packed rows (qv_jax/batch.py) the same mean over every
packed sample's tokens, CE also reported per sample) + aux_weight · Σ over the step's video samples of each
sample's mean‖z‖₂ / (all samples of the step; empty slots of packed rows are not samples): the reference's
effective weight, whose per-device term (one sample per device) is 0 on image-only devices and is averaged over
all devices by data parallelism. `train.aux_normalization="video_samples"` divides by the number of video
samples instead. The `aux` metric is the term as it enters the loss, without aux_weight.
The count is taken from the pre-merge labels (equal to the merged one unless a sequence was truncated at
data.max_seq_len; truncations are reported as a metric). Micro-batch i takes samples i, i+A, i+2A, ...
so every device holds a share of each micro-batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qv_jax.batch import MODALITY_EMPTY, MODALITY_VIDEO, is_packed
from qv_jax.sharding import constrain
from qv_jax.train.loss import chunked_cross_entropy, cubing_aux_per_sample, supervised_count
from qv_jax.train.schedules import learning_rate_schedule, noise_weight
from qv_jax.train.state import TrainState


def cube_length_histogram(cube_ids, cube_mask, num_frames, is_video, max_len: int):
  """Counts of cube lengths 0..max_len over the real cubes of video samples: [max_len + 1] int32."""
  frames = jnp.arange(cube_ids.shape[1])[None, :] < num_frames[:, None]
  kmax = cube_mask.shape[1]
  onehot = (cube_ids[:, :, None] == jnp.arange(kmax)[None, None, :]) & frames[:, :, None]
  lengths = onehot.sum(1)                                          # [B, Kmax]
  weights = (cube_mask & is_video[:, None]).astype(jnp.int32)
  return jnp.zeros((max_len + 1,), jnp.int32).at[jnp.clip(lengths, 0, max_len)].add(weights)


def _microbatches(batch: dict, accum: int) -> dict:
  """[B, ...] -> [A, B/A, ...] with micro-batch i = samples i, i+A, ..."""
  def split(x):
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, "activation_batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def _unsplit(x):
  """[A, B/A, ...] -> [B, ...], undoing `_microbatches`."""
  return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


def make_train_step(graphdef, config, tx: optax.GradientTransformation):
  """-> step(state, batch) -> (state, metrics), to be jitted by the caller (with shardings, donation).
  A `score_gating` compressor with `train.score_rollouts` > 0 trains its policy by RL (train/score_rl.py)."""
  t = config.train
  if config.model.compressor.kind == "score_gating" and int(t.score_rollouts) > 0:
    from qv_jax.train.score_rl import make_score_train_step
    return make_score_train_step(graphdef, config, tx)
  accum = int(t.grad_accum)
  aux_weight = float(t.aux_weight)
  aux_over_videos = t.aux_normalization == "video_samples"
  encode_images = bool(t.encode_images)
  lr_schedule = learning_rate_schedule(t)
  max_frames = max(int(f) for f in config.data.frame_buckets)
  max_seq_len = int(config.data.max_seq_len)

  def micro_loss(params, frozen, micro, key, eta, denom, aux_denom):
    model = nnx.merge(graphdef, params, frozen)
    out = model(micro, key=key, noise_weight=eta, encode_images=encode_images)
    packed = is_packed(micro)
    ce_sum, count = chunked_cross_entropy(
        out.hidden, out.inputs.labels, model.decoder.logits_from_hidden, int(t.ce_chunk),
        segment_ids=out.inputs.segment_ids if packed else None,
        num_segments=micro["modality"].shape[1] if packed else 1)
    modality, num_frames = micro["modality"].reshape(-1), micro["num_frames"].reshape(-1)
    is_video = modality == MODALITY_VIDEO
    aux = cubing_aux_per_sample(out.cubes.logits, out.cubes.logit_mask, is_video)
    loss = ce_sum.sum() / denom + aux_weight * aux.sum() / aux_denom
    cubes = out.cubes
    stats = dict(
        ce_sum=ce_sum, count=count, aux=aux.reshape(micro["modality"].shape),
        merged_tokens=out.inputs.mask.sum(-1), truncated=out.inputs.truncated,
        cube_hist=cube_length_histogram(cubes.cube_ids, cubes.cube_mask, num_frames, is_video, max_frames))
    return loss, stats

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict[str, Any]]:
    key = jax.random.fold_in(state.rng, state.step)
    eta = noise_weight(state.step, t)
    denom = jnp.maximum(supervised_count(batch["labels"]).sum(), 1.0)
    if aux_over_videos:
      aux_denom = jnp.maximum((batch["modality"] == MODALITY_VIDEO).sum(), 1).astype(jnp.float32)
    else:
      aux_denom = jnp.maximum((batch["modality"] != MODALITY_EMPTY).sum(), 1).astype(jnp.float32)
    keys = ("ce_sum", "count", "merged_tokens", "truncated", "aux")
    if accum == 1:
      (loss, stats), grads = grad_fn(state.params, state.frozen, batch, key, eta, denom, aux_denom)
      per_sample = {k: stats[k] for k in keys}
      cube_hist = stats["cube_hist"]
    else:
      micro = _microbatches(batch, accum)

      def body(acc, mb):
        (loss_i, stats_i), g = grad_fn(state.params, state.frozen, mb, key, eta, denom, aux_denom)
        acc = jax.tree.map(jnp.add, acc, (g, loss_i))
        return acc, stats_i

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, loss), stats = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), micro)
      per_sample = {k: _unsplit(stats[k]) for k in keys}
      cube_hist = stats["cube_hist"].sum(0)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    merged_tokens = per_sample["merged_tokens"].sum()
    decoder_slots = batch["segment_ids"].size if is_packed(batch) else batch["input_ids"].shape[0] * max_seq_len
    metrics = dict(
        loss=loss, ce=per_sample["ce_sum"].sum() / denom, aux=per_sample["aux"].sum() / aux_denom, eta=eta,
        learning_rate=lr_schedule(state.step), grad_norm=grad_norm,
        supervised_tokens=per_sample["count"].sum(), merged_tokens=merged_tokens,
        padding_fraction=1.0 - merged_tokens / decoder_slots,
        truncated_tokens=per_sample["truncated"].sum(), cube_length_hist=cube_hist,
        sample_ce=(per_sample["ce_sum"] / jnp.maximum(per_sample["count"], 1.0)).reshape(-1),
        sample_id=batch["sample_id"].reshape(-1))
    return new_state, metrics

  return step

