"""Exact cubing with a sample's frames split over `context`, and the reference's approximate chunking.

The cubing logits need only the per-frame token means (DESIGN.md), so each chip pools its own frames and
the F × Dv means are all-gathered over context; the momentum scan, the MLP and the Gumbel top-k then run
on identical inputs with the same per-sample key on every chip, so the boundaries equal the unsharded
ones. The thumbnail's ẑ-weighted frame sum is a psum of per-chip partial sums (GSPMD emits it).

`chunked_reference_boundaries` is the reference's sequence-parallel behaviour (SPEC §3, §11.15), kept
only to show that it is not the same computation: each chunk restarts the momentum, forces a boundary
at its first frame, takes its own k, and the thumbnail is the average of per-chunk thumbnails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qv_jax.model import gumbel
from qv_jax.model.cubing import thumbnail_features
from qv_jax.sharding import constrain


def global_frame_means(means: jax.Array) -> jax.Array:
  """[B, F, Dv] frame means -> the same, whole on every chip of the context (and fsdp) axes."""
  return constrain(means, ("activation_batch", None, None))


def chunked_reference_boundaries(cubing, pooled: jax.Array, chunks: int, frames_per_cube: int,
                                 tau: float):
  """Reference-style SP cubing of ONE sample with all F frames valid (η = 0): pooled [F, P/9, Dv]
  fp32, F = chunks · L. Returns (hard boundaries [F] fp32 with a forced 1 at every chunk start, the
  averaged thumbnail features [P/9, Dv])."""
  frames = pooled.shape[0]
  length = frames // chunks
  bounds, thumbs = [], []
  for c in range(chunks):
    part = pooled[c * length:(c + 1) * length][None]                   # [1, L, P/9, Dv]
    logits = cubing(part.mean(axis=2))                                   # momentum restarts here
    n = jnp.array([length], jnp.int32)
    inner = gumbel.inner_boundaries(n, frames_per_cube)
    kmax = gumbel.max_cubes(length, frames_per_cube)
    probs = gumbel.boundary_probs(logits, None, 0.0, tau)
    mask = jnp.ones((1, length - 1), bool)
    hard = gumbel.topk_boundaries(probs, mask, inner, kmax - 1)
    rows = jnp.concatenate([jnp.ones((1, 1)), hard], axis=1)             # forced boundary at chunk start
    bounds.append(rows[0])
    thumbs.append(thumbnail_features(part, rows)[0])
  return jnp.concatenate(bounds), sum(thumbs) / chunks
