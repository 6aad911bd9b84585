"""The `train` section: stages (SPEC §7), optimiser, schedules, checkpoints and metrics."""

import ml_collections

from qv_jax.config.errors import require

# Which parameter groups train in each stage. `vision_tower` trains in stages 2-3 as the paper intends;
# `train.reference_frozen_vision_tower=True` reproduces the reference, whose tower never gets a gradient.
STAGE_TRAINABLE = {
    1: ("compressor", "embed_tokens"),
    2: ("compressor", "lm_head", "vision_tower"),
    3: ("compressor", "vision_tower", "decoder"),
}
STAGE_LEARNING_RATE = {1: 1e-4, 2: 1e-5, 3: 1e-5}
AUX_NORMALIZATIONS = ("all_samples", "video_samples")
PARAM_GROUPS = ("compressor", "embed_tokens", "lm_head", "vision_tower", "decoder", "policy")


def train_defaults(stage: int) -> ml_collections.ConfigDict:
  require(stage in STAGE_TRAINABLE, "train.stage", f"unknown stage {stage!r}; expected 1, 2 or 3")
  return ml_collections.ConfigDict(dict(
      stage=stage,
      learning_rate=STAGE_LEARNING_RATE.get(stage, 1e-5),
      warmup_ratio=0.02,
      total_steps=1000,            # optimizer steps of this stage (the lr and η schedules span them)
      grad_accum=1,                # micro-batches per optimizer step (data.batch_size is the whole step)
      grad_clip=1.0,
      adam_b1=0.9,
      adam_b2=0.999,
      adam_eps=1e-8,
      weight_decay=0.0,
      aux_weight=0.001,
      aux_normalization="all_samples",  # Σ_videos mean‖z‖ / all samples (the reference); "video_samples": / videos
      gumbel_eta_max=1.0,
      gumbel_eta_min=0.01,
      gumbel_anneal_fraction=0.6,
      reference_frozen_vision_tower=False,
      trainable_override=(),       # non-empty: these PARAM_GROUPS train instead of the stage's
      encode_images=True,          # False: video-only data; skips the per-crop resampler pass
      ce_chunk=2048,               # decoder positions per logits chunk in the loss (bounds [B, c, V])
      score_rollouts=0,            # score_gating: G > 0 trains the gating policy by RL (train/score_rl.py)
      score_ce_tolerance=0.05,     # score_gating RL: a rollout is safe while CE ≤ CE_all_tokens + this
      score_curriculum="videos",   # score_gating RL: "pseudo_videos" (each video made piecewise static)
      score_repeat=4,              # pseudo_videos: frames per repeated still
      seed=0,
      compilation_cache_dir="",    # persistent XLA compilation cache ("" = off); reused across runs
      workdir="",
      init_from="",                # previous stage's checkpoint directory (a workdir or a step directory)
      checkpoint_every=500,
      keep_checkpoints=3,
      allow_config_change=(),      # resume despite these changed fields/sections ("all"); see config_change.py
      async_checkpointing=True,
      stop_at=0,                   # > 0: save and stop after this many steps (a clean interruption)
      log_every=10,
      tensorboard=True,
      progress_bar=True,
  ))


def validate_train(t) -> None:
  f = "train"
  require(t.stage in STAGE_TRAINABLE, f"{f}.stage", f"unknown stage {t.stage!r}; expected 1, 2 or 3")
  require(t.learning_rate > 0, f"{f}.learning_rate", f"must be positive, got {t.learning_rate}")
  require(0 <= t.warmup_ratio < 1, f"{f}.warmup_ratio", f"{t.warmup_ratio} not in [0, 1)")
  require(t.total_steps > 0, f"{f}.total_steps", f"must be positive, got {t.total_steps}")
  require(t.grad_accum >= 1, f"{f}.grad_accum", f"must be >= 1, got {t.grad_accum}")
  require(t.grad_clip > 0, f"{f}.grad_clip", f"must be positive, got {t.grad_clip}")
  require(0 < t.gumbel_anneal_fraction <= 1, f"{f}.gumbel_anneal_fraction",
          f"{t.gumbel_anneal_fraction} not in (0, 1]")
  require(t.gumbel_eta_max >= t.gumbel_eta_min >= 0, f"{f}.gumbel_eta_min",
          f"need gumbel_eta_max >= gumbel_eta_min >= 0, got {t.gumbel_eta_max} and {t.gumbel_eta_min}")
  require(t.aux_normalization in AUX_NORMALIZATIONS, f"{f}.aux_normalization",
          f"{t.aux_normalization!r}; expected one of {AUX_NORMALIZATIONS}")
  require(t.keep_checkpoints >= 1, f"{f}.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
  require(t.checkpoint_every >= 1, f"{f}.checkpoint_every", f"must be >= 1, got {t.checkpoint_every}")
  require(t.log_every >= 1, f"{f}.log_every", f"must be >= 1, got {t.log_every}")
  require(t.ce_chunk >= 1, f"{f}.ce_chunk", f"must be >= 1, got {t.ce_chunk}")
  require(int(t.score_rollouts) >= 0, f"{f}.score_rollouts", f"must be >= 0, got {t.score_rollouts}")
  require(t.score_curriculum in ("pseudo_videos", "videos"), f"{f}.score_curriculum",
          f"{t.score_curriculum!r}; expected 'pseudo_videos' or 'videos'")
  require(int(t.score_repeat) >= 1, f"{f}.score_repeat", f"must be >= 1, got {t.score_repeat}")
  require(t.stop_at >= 0, f"{f}.stop_at", f"must be >= 0, got {t.stop_at}")
  require(all(isinstance(a, str) for a in t.allow_config_change), f"{f}.allow_config_change",
          f"expected field names, got {tuple(t.allow_config_change)!r}")
  bad = [g for g in t.trainable_override if g not in PARAM_GROUPS]
  require(not bad, f"{f}.trainable_override", f"unknown groups {bad}; expected some of {PARAM_GROUPS}")


def validate_train_against(config) -> None:
  """Cross-section checks: the batch must split into grad_accum equal micro-batches."""
  t, d = config.train, config.data
  require(d.batch_size % t.grad_accum == 0, "train.grad_accum",
          f"{t.grad_accum} does not divide data.batch_size {d.batch_size}")
