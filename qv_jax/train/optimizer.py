"""The optimizer (SPEC §7): global-norm clipping, then AdamW (b1, b2, eps, weight decay from the config)
with the warmup-cosine schedule, over the trainable parameters only. Frozen parameters are not in the
optimizer's tree at all (`stages.split_model`), so they keep no moments and are never touched."""

from __future__ import annotations

import optax

from qv_jax.train.schedules import learning_rate_schedule


def make_optimizer(train_config) -> optax.GradientTransformation:
  t = train_config
  return optax.chain(
      optax.clip_by_global_norm(float(t.grad_clip)),
      optax.adamw(learning_rate_schedule(t), b1=float(t.adam_b1), b2=float(t.adam_b2),
                  eps=float(t.adam_eps), weight_decay=float(t.weight_decay)),
  )
