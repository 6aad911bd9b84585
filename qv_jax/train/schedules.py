"""Schedules: the learning rate (HF `cosine`: linear warmup over ceil(warmup_ratio · total) steps, then
cosine to 0) and the Gumbel noise weight η(step), restarting at every stage (SPEC §6)."""

from __future__ import annotations

import math

import optax

from qv_jax.model.gumbel import gumbel_noise_weight


def warmup_steps(train_config) -> int:
  return int(math.ceil(train_config.warmup_ratio * train_config.total_steps))


def learning_rate_schedule(train_config) -> optax.Schedule:
  """lr(step) for optimizer steps 0..total_steps-1: step/warmup · lr during warmup, then
  lr · (1 + cos(π · (step − warmup) / (total − warmup))) / 2."""
  warm = warmup_steps(train_config)
  peak = float(train_config.learning_rate)
  total = int(train_config.total_steps)
  if warm == 0:
    return optax.cosine_decay_schedule(peak, max(total, 1), alpha=0.0)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(total, warm + 1), end_value=0.0)


def noise_weight(step, train_config):
  """η(step) of `gumbel_noise_weight` with the stage's gumbel_eta_max / gumbel_eta_min /
  gumbel_anneal_fraction; `step` counts optimizer steps completed in this stage (0 on the first batch)."""
  t = train_config
  return gumbel_noise_weight(step, t.total_steps, eta_max=t.gumbel_eta_max, eta_min=t.gumbel_eta_min,
                             fraction=t.gumbel_anneal_fraction)
