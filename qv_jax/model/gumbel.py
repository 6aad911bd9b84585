"""Cube counts, the Gumbel noise schedule η(step) and the boundary selection of the cubing network.

A video of N valid frames gets k = max(round(N / FPQ) - 1, 1) inner boundaries, so k + 1 cubes; frame 0
always starts a cube. Learned placement ("gumbel", SPEC §3.6): p = softmax((z + η·g) / τ)[..., 1] with
Gumbel noise g, the top-k rows of p become boundaries, and the straight-through ẑ = h + (p - sg(p)) is
exactly the hard 0/1 vector h forward and has the gradient of p. Uniform placement ("uniform", the
paper's baseline): the same k + 1 cubes, cube j starting at frame floor(j·N / (k+1)), so cube lengths
differ by at most one (a cube every FPQ frames when FPQ divides N).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

GUMBEL_EPS = 1e-20


def num_cubes(num_frames, frames_per_cube: int = 5):
  """k + 1 = max(round(N / FPQ) - 1, 1) + 1 cubes for N frames (round half to even, like Python's).

  Python ints give an int; NumPy / JAX arrays give int32 arrays of the same shape."""
  if isinstance(num_frames, (int, np.integer)):
    return max(round(int(num_frames) / frames_per_cube) - 1, 1) + 1
  xp = jnp if isinstance(num_frames, jax.Array) else np
  n = xp.asarray(num_frames)
  inner = xp.round(n.astype(xp.float32) / frames_per_cube).astype(xp.int32) - 1
  return xp.maximum(inner, 1) + 1


def max_cubes(frame_bucket: int, frames_per_cube: int = 5) -> int:
  """Kmax, the static cube count of a bucket of F frames (the count grows with N, so it is N = F's)."""
  return num_cubes(int(frame_bucket), frames_per_cube)


def gumbel_noise_weight(step, total_steps, eta_max: float = 1.0, eta_min: float = 0.01,
                        fraction: float = 0.6):
  """η(step) = η_min + (η_max - η_min)·(1 + cos(π·step / M)) / 2 for step ≤ M,
  M = fraction·total_steps, and η_min after (DESIGN.md; the reference's CosineAnnealer with base 1.0, final 0.01). fp32 scalar."""
  horizon = max(float(fraction) * float(total_steps), 1e-9)
  step = jnp.asarray(step, jnp.float32)
  cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(step, horizon) / horizon))
  return jnp.where(step <= horizon, eta_min + (eta_max - eta_min) * cosine, eta_min).astype(jnp.float32)


def sample_keys(key: jax.Array, sample_ids: jax.Array) -> jax.Array:
  """Per-sample keys fold_in(key, sample_id): noise independent of batch layout and device count."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(sample_ids)


def boundary_probs(logits: jax.Array, keys: jax.Array | None, noise_weight, tau: float) -> jax.Array:
  """p = softmax((z + η·g) / τ)[..., 1], fp32. logits [B, R, 2]; keys [B] (None: no noise)."""
  z = logits.astype(jnp.float32)
  if keys is not None:
    u = jax.vmap(lambda k: jax.random.uniform(k, z.shape[1:], jnp.float32))(keys)
    g = -jnp.log(-jnp.log(u + GUMBEL_EPS) + GUMBEL_EPS)
    z = z + jnp.asarray(noise_weight, jnp.float32) * g
  return jax.nn.softmax(z / tau, axis=-1)[..., 1]


def topk_boundaries(scores: jax.Array, row_mask: jax.Array, inner: jax.Array, max_inner: int) -> jax.Array:
  """Hard boundaries h [B, R] (0./1.): the `inner[b]` highest `scores` among valid rows.

  scores [B, R]; row_mask [B, R] (padded rows are never picked); inner [B] int32 ≤ max_inner ≤ R, and
  inner[b] ≤ the sample's valid rows. Ties go to the lower index."""
  masked = jnp.where(row_mask, scores, -jnp.inf)
  _, index = jax.lax.top_k(masked, max_inner)                       # [B, max_inner]
  keep = jnp.arange(max_inner)[None, :] < inner[:, None]
  onehot = jax.nn.one_hot(index, scores.shape[-1], dtype=jnp.float32)  # [B, max_inner, R]
  return jnp.max(onehot * keep[..., None], axis=1)


def uniform_boundaries(num_frames: jax.Array, inner: jax.Array, num_rows: int, max_inner: int) -> jax.Array:
  """Hard boundaries h [B, R]: cube j (j = 1..k) starts at frame floor(j·N / (k+1)), row = frame - 1."""
  j = jnp.arange(1, max_inner + 1)[None, :]                           # [1, max_inner]
  start = (j * num_frames[:, None]) // (inner[:, None] + 1)
  onehot = jax.nn.one_hot(start - 1, num_rows, dtype=jnp.float32)
  return jnp.max(onehot * (j <= inner[:, None])[..., None], axis=1)


def straight_through(hard: jax.Array, probs: jax.Array, row_mask: jax.Array) -> jax.Array:
  """ẑ = h + (p - sg(p)) on valid rows: exactly h forward, ∂ẑ/∂p = 1 (0 on padded rows)."""
  return hard + jnp.where(row_mask, probs - jax.lax.stop_gradient(probs), 0.0)


def inner_boundaries(num_frames: jax.Array, frames_per_cube: int) -> jax.Array:
  """k [B] int32 = num_cubes(N) - 1."""
  return num_cubes(num_frames, frames_per_cube) - 1
