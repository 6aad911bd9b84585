"""The vision tower with a sample's frames split over `context`: each chip encodes its own frames."""

from __future__ import annotations

import jax

from qv_jax.parallel.context import check_divisible, context_size
from qv_jax.sharding import FRAME_AXES, axis_rules, constrain, current_rules


def encode_frames_split(tower, pixels: jax.Array) -> jax.Array:
  """pixels [B, F, S, S, 3] -> [B, F, P, Dv] frames split over context (F divisible by its size C).

  The frames are viewed as [B·C, F/C] rows laid out over (data, fsdp, context), so the tower's chunk
  loop runs over each chip's own F/C frames with no communication; the result is [B, F] again with
  F over context."""
  c = context_size()
  b, f = pixels.shape[:2]
  check_divisible("frames (the frame bucket F)", f, c)
  rows = constrain(pixels.reshape(b * c, f // c, *pixels.shape[2:]),
                   ("activation_context_batch",) + (None,) * (pixels.ndim - 1))
  rules = dict(current_rules())
  rules.update(activation_batch=rules.get("activation_context_batch"), activation_frames=None)
  with axis_rules(tuple(rules.items())):
    out = tower.encode_frames(rows)
  out = out.reshape(b, f, *out.shape[2:])
  return constrain(out, FRAME_AXES)
