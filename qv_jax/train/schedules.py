"""Schedules: the learning rate (HF `cosine`: linear warmup over ceil(warmup_ratio · total) steps, then
cosine to 0) and the Gumbel noise weight η(step), restarting at every stage (SPEC §6)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax


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
  """η(step) = η_min + (η_max − η_min)·(1 + cos(π·step/M))/2 for step ≤ M = fraction · total_steps, η_min
  after; `step` counts optimizer steps completed in this stage (0 on the first batch). Traceable."""
  t = train_config
  horizon = max(float(t.gumbel_anneal_fraction) * float(t.total_steps), 1e-9)
  s = jnp.minimum(jnp.asarray(step, jnp.float32), horizon)
  cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * s / horizon))
  return t.gumbel_eta_min + (t.gumbel_eta_max - t.gumbel_eta_min) * cosine
