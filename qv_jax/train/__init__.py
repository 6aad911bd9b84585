"""Training: stages and parameter groups, optimizer and schedules, the jitted step, checkpoints, metrics
and the loop (`qv_jax.train.loop.train`)."""
