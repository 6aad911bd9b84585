"""The fast resampler's segment attention with a sample's frames split over the `context` axis, exact.

Each chip runs the chunked online softmax of `resampler_fast` over its own frames, giving per cube its
normalised partial y_i [B, K, HQ, Dv] and log-sum-exp lse_i [B, K, HQ] (cubes with no local frame are
absent). The partials combine by log-sum-exp rescaling: M = pmax(lse_i), w_i = exp(lse_i - M),
y = psum(w_i·y_i) / psum(w_i), lse = M + log psum(w_i). A cube that straddles chips is thus the same
softmax as on one chip. The backward is the single-chip one run locally against the global (y, lse): it
gives each chip's share of dx and of the weight gradients, which are summed over context and batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qv_jax.model.resampler_fast import _forward, _segment_attention_bwd
from qv_jax.parallel.context import AXIS
from qv_jax.sharding import logical_to_pspec


def _specs(x):
  """(batch axes or None, the batch-axis names to reduce over) for x [B, F, ...] under the mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  spec = logical_to_pspec(("activation_batch",), None, mesh, x.shape[:1])
  batch = spec[0] if len(spec) else None
  names = () if batch is None else (batch if isinstance(batch, tuple) else (batch,))
  return batch, names


def _present(cube_ids, frame_valid, num_cubes):
  onehot = (cube_ids[:, :, None] == jnp.arange(num_cubes)[None, None, :]) & frame_valid[:, :, None]
  return onehot.any(axis=1)                                                  # [B, K]


def _local_forward(x, a, g, e_time, e_space, cube_ids, frame_valid, *, num_cubes, cf, eps):
  y, lse, _ = _forward(x, a, g, e_time, e_space, cube_ids, frame_valid, num_cubes, cf, eps)
  present = _present(cube_ids, frame_valid, num_cubes)[..., None]            # [B, K, 1]
  m = jnp.where(present, lse, -jnp.inf)
  top = jax.lax.pmax(m, AXIS)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w = jnp.where(present, jnp.exp(m - top), 0.0)
  total = jax.lax.psum(w, AXIS)
  ok = total > 0
  y = jax.lax.psum(w[..., None] * y, AXIS) / jnp.where(ok, total, 1.0)[..., None]
  return y, jnp.where(ok, top + jnp.log(jnp.where(ok, total, 1.0)), 0.0)


def _sharded_forward(x, a, g, e_time, e_space, cube_ids, frame_valid, num_cubes, cf, eps):
  batch, _ = _specs(x)
  frames = P(batch, AXIS)
  fn = functools.partial(_local_forward, num_cubes=num_cubes, cf=cf, eps=eps)
  return jax.shard_map(fn, in_specs=(frames, P(), P(), P(AXIS), P(), frames, frames),
                       out_specs=(P(batch), P(batch)), check_vma=False)(
                           x, a, g, e_time, e_space, cube_ids, frame_valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def context_segment_attention(x, a, g, e_time, e_space, cube_ids, frame_valid, num_cubes, cf, eps):
  """`resampler_fast.segment_attention` with x [B, F, P, Dv], e_time [F, HQ], cube_ids and
  frame_valid [B, F] split over `context` along F (F divisible by its size); cf: frames per chunk of
  the local F / C frames. Returns y [B, K, HQ, Dv] fp32, replicated over context."""
  return _sharded_forward(x, a, g, e_time, e_space, cube_ids, frame_valid, num_cubes, cf, eps)[0]


def _fwd(x, a, g, e_time, e_space, cube_ids, frame_valid, num_cubes, cf, eps):
  y, lse = _sharded_forward(x, a, g, e_time, e_space, cube_ids, frame_valid, num_cubes, cf, eps)
  return y, (x, a, g, e_time, e_space, cube_ids, frame_valid, y, lse)


def _bwd(num_cubes, cf, eps, res, dy):
  x = res[0]
  batch, batch_names = _specs(x)
  frames = P(batch, AXIS)

  def local(x, a, g, e_time, e_space, cube_ids, frame_valid, y, lse, dy):
    grads = _segment_attention_bwd(num_cubes, cf, eps, False,
                                   (x, a, g, e_time, e_space, cube_ids, frame_valid, y, lse, None), dy)
    dx, da, dg, de_time, de_space = grads[:5]
    everywhere = (AXIS,) + batch_names
    da, dg, de_space = (jax.lax.psum(t, everywhere) for t in (da, dg, de_space))
    if batch_names:
      de_time = jax.lax.psum(de_time, batch_names)
    return dx, da, dg, de_time, de_space

  grads = jax.shard_map(
      local, in_specs=(frames, P(), P(), P(AXIS), P(), frames, frames, P(batch), P(batch), P(batch)),
      out_specs=(frames, P(), P(), P(AXIS), P()), check_vma=False)(*res, dy)
  return (*grads, None, None)


context_segment_attention.defvjp(_fwd, _bwd)
