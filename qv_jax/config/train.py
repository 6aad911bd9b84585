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


def train_defaults(stage: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      stage=stage,
      learning_rate=STAGE_LEARNING_RATE.get(stage, 1e-5),
      warmup_ratio=0.02,
      total_steps=1000,
      grad_accum=1,
      grad_clip=1.0,
      adam_b1=0.9,
      adam_b2=0.999,
      adam_eps=1e-8,
      weight_decay=0.0,
      aux_weight=0.001,
      gumbel_eta_max=1.0,
      gumbel_eta_min=0.01,
      gumbel_anneal_fraction=0.6,
      reference_frozen_vision_tower=False,
      seed=0,
      workdir="",
      init_from="",                # previous stage's checkpoint directory
      checkpoint_every=500,
      keep_checkpoints=3,
      log_every=10,
  ))


def validate_train(t) -> None:
  f = "train"
  require(t.stage in STAGE_TRAINABLE, f"{f}.stage", f"unknown stage {t.stage!r}; expected 1, 2 or 3")
  require(t.learning_rate > 0, f"{f}.learning_rate", f"must be positive, got {t.learning_rate}")
  require(0 <= t.warmup_ratio < 1, f"{f}.warmup_ratio", f"{t.warmup_ratio} not in [0, 1)")
  require(t.total_steps > 0, f"{f}.total_steps", f"must be positive, got {t.total_steps}")
  require(t.grad_accum >= 1, f"{f}.grad_accum", f"must be >= 1, got {t.grad_accum}")
  require(0 < t.gumbel_anneal_fraction <= 1, f"{f}.gumbel_anneal_fraction",
          f"{t.gumbel_anneal_fraction} not in (0, 1]")
  require(t.keep_checkpoints >= 1, f"{f}.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
