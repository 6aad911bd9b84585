"""The fast resampler attention (DESIGN.md, "The resampler without materialising K and V").

All cubes share the 64 queries, so the key and value projections move onto the queries, exactly. With
W_c = W_kv - mean_D(W_kv) (so u_t - μ_t = W_cᵀx_t), σ_t² = x_tᵀ G x_t + ε (G = W_c W_cᵀ / D),
q̃_hj = W_k,h q_hj / √d_h and γ, β the LN_kv scale and bias:

  score_hj(t) = x_t·Ã_hj / σ_t + q̃_hj·pos_t + const,   Ã_hj = W_c (γ ⊙ q̃_hj)   (const cancels)
  out_hj(c)   = y_hj(c) B_h + β W_v,h + b_v,h,          B_h = W_c diag(γ) W_v,h
  y_hj(c)     = Σ_{t∈c} softmax_c(score_hj)_t · x_t / σ_t            (an [HQ, Dv] sum per cube)

and the position term splits into a per-frame [F, HQ] and a per-token [P, HQ] table. Per token this is
one [Dv, HQ+Dv] matmul (scores and σ) and one [HQ, Dv] weighted sum, about 5 M multiply-adds at the
released size instead of ~30 M, and no [tokens, D] activation exists. `segment_attention` runs it over
chunks of frames with an online (max, sum) per cube and has a flash-attention style custom VJP: the
backward either reads the fp32 scores saved by the forward (`save_scores`, O(F·P·HQ) memory) or
recomputes them chunk by chunk (O(F·P·Dv + K·HQ·Dv) memory, a quarter more FLOPs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from qv_jax.model.resampler_plain import scaled_queries
from qv_jax.model.sincos import sincos_3d_parts

_NEG = -1e30
_HI = lax.Precision.HIGHEST


def frames_per_chunk(frames: int, max_frames: int) -> int:
  """A static chunk size in [max_frames // 2, max_frames] that wastes the fewest frames (the last
  chunk overlaps the previous one); ties go to the larger chunk."""
  max_frames = max(1, min(max_frames, frames))
  if max_frames == frames:
    return frames
  candidates = range(max(1, max_frames // 2), max_frames + 1)
  return min(candidates, key=lambda c: (-(-frames // c) * c, -c))


def _rows(a, i):
  return jax.vmap(lambda ab, ib: ab[ib])(a, i)


def _set_rows(a, i, v):
  return jax.vmap(lambda ab, ib, vb: ab.at[ib].set(vb))(a, i, v)


def _chunk(x, e_time, cube_ids, frame_valid, i, cf, num_cubes):
  frames = x.shape[1]
  start = jnp.minimum(i * cf, frames - cf)
  valid = lax.dynamic_slice_in_dim(frame_valid, start, cf, axis=1)
  xc = jnp.where(valid[:, :, None, None], lax.dynamic_slice_in_dim(x, start, cf, axis=1), 0)
  fresh = (start + jnp.arange(cf)) >= i * cf          # the last chunk overlaps the previous one
  use = valid & fresh[None, :]
  cid = jnp.clip(lax.dynamic_slice_in_dim(cube_ids, start, cf, axis=1), 0, num_cubes - 1)
  et = lax.dynamic_slice_in_dim(e_time, start, cf, axis=0)
  return start, xc, use, cid, et


def _scores(xc, ag, et, e_space, eps, hq):
  """Scores s [B, cf, P, HQ] fp32, raw x·Ã, x·G [B, cf, P, Dv] and 1/σ [B, cf, P]."""
  z = jnp.einsum("bfpv,vk->bfpk", xc, ag, preferred_element_type=jnp.float32)
  raw, xg = z[..., :hq], z[..., hq:]
  # row dot products as einsums: XLA:CPU runs multiply+reduce fusions far slower than dots
  inv_sigma = lax.rsqrt(jnp.einsum("bfpv,bfpv->bfp", xg, xc.astype(jnp.float32)) + eps)
  s = raw * inv_sigma[..., None] + et[None, :, None, :] + e_space[None, None]
  return s, raw, xg, inv_sigma


def _forward(x, a, g, e_time, e_space, cube_ids, frame_valid, num_cubes, cf, eps, save_scores=False):
  """(y [B, K, HQ, Dv], lse [B, K, HQ], saved): saved = (scores [B, F, P, HQ], 1/σ [B, F, P]) when
  save_scores, else None."""
  b, frames, tokens, dv = x.shape
  hq = a.shape[1]
  ag = jnp.concatenate([a, g], axis=1)

  def chunk(i, carry):
    ys, ms, ls, saved = carry
    start, xc, use, cid, et = _chunk(x, e_time, cube_ids, frame_valid, i, cf, num_cubes)
    s, _, _, inv_sigma = _scores(xc, ag, et, e_space, eps, hq)
    if saved is not None:
      saved = (lax.dynamic_update_slice_in_dim(saved[0], s, start, 1),
               lax.dynamic_update_slice_in_dim(saved[1], inv_sigma, start, 1))
    m = jnp.where(use[..., None], s.max(axis=2), _NEG)                       # [B, cf, HQ]
    e = jnp.where(use[:, :, None, None], jnp.exp(s - m[:, :, None]), 0.0)
    l = e.sum(axis=2)
    y = jnp.einsum("bfph,bfpv->bfhv", (e * inv_sigma[..., None]).astype(x.dtype), xc,
                   preferred_element_type=jnp.float32)                        # [B, cf, HQ, Dv]

    def merge(j, carry):
      ys, ms, ls = carry
      c = lax.dynamic_index_in_dim(cid, j, axis=1, keepdims=False)
      mj = lax.dynamic_index_in_dim(m, j, axis=1, keepdims=False)
      lj = lax.dynamic_index_in_dim(l, j, axis=1, keepdims=False)
      yj = lax.dynamic_index_in_dim(y, j, axis=1, keepdims=False)
      m_old = _rows(ms, c)
      m_new = jnp.maximum(m_old, mj)
      a_old, a_new = jnp.exp(m_old - m_new), jnp.exp(mj - m_new)
      ls = _set_rows(ls, c, _rows(ls, c) * a_old + lj * a_new)
      ys = _set_rows(ys, c, _rows(ys, c) * a_old[..., None] + yj * a_new[..., None])
      return ys, _set_rows(ms, c, m_new), ls

    return (*lax.fori_loop(0, cf, merge, (ys, ms, ls)), saved)

  saved = None
  if save_scores:
    saved = (jnp.zeros((b, frames, tokens, hq), jnp.float32), jnp.zeros((b, frames, tokens), jnp.float32))
  init = (jnp.zeros((b, num_cubes, hq, dv), jnp.float32),
          jnp.full((b, num_cubes, hq), _NEG, jnp.float32),
          jnp.zeros((b, num_cubes, hq), jnp.float32), saved)
  y, m, l, saved = lax.fori_loop(0, -(-frames // cf), chunk, init)
  ok = l > 0
  safe = jnp.where(ok, l, 1.0)
  return y / safe[..., None], jnp.where(ok, m + jnp.log(safe), 0.0), saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def segment_attention(x, a, g, e_time, e_space, cube_ids, frame_valid, num_cubes, cf, eps,
                      save_scores=True):
  """y [B, K, HQ, Dv] fp32: per cube c and head-query hq, Σ_{t∈c} softmax_c(s)_t · x_t / σ_t with
  s_t = x_t·a / σ_t + e_time[f(t)] + e_space[p(t)] and σ_t = sqrt(x_tᵀ g x_t + eps).

  x [B, F, P, Dv]; a [Dv, HQ]; g [Dv, Dv] symmetric; e_time [F, HQ]; e_space [P, HQ]; cube_ids [B, F]
  int; frame_valid [B, F] bool (invalid frames belong to no cube); static: num_cubes K, cf frames per
  chunk, eps, save_scores (keep the fp32 scores [B, F, P, HQ] for the backward instead of recomputing
  them: a quarter fewer FLOPs for that memory). Cubes with no valid frame give 0."""
  return _forward(x, a, g, e_time, e_space, cube_ids, frame_valid, num_cubes, cf, eps)[0]


def _segment_attention_fwd(x, a, g, e_time, e_space, cube_ids, frame_valid, num_cubes, cf, eps,
                           save_scores):
  y, lse, saved = _forward(x, a, g, e_time, e_space, cube_ids, frame_valid, num_cubes, cf, eps,
                           save_scores)
  return y, (x, a, g, e_time, e_space, cube_ids, frame_valid, y, lse, saved)


def _segment_attention_bwd(num_cubes, cf, eps, save_scores, res, dy):
  x, a, g, e_time, e_space, cube_ids, frame_valid, y, lse, saved = res
  frames, tokens, dv = x.shape[1:]
  hq = a.shape[1]
  ag = jnp.concatenate([a, g], axis=1)
  dy = dy.astype(jnp.float32)
  delta = jnp.einsum("bkhv,bkhv->bkh", dy, y)                                # [B, K, HQ]

  def chunk(i, carry):
    dx, dag, de_time, de_space = carry
    start, xc, use, cid, et = _chunk(x, e_time, cube_ids, frame_valid, i, cf, num_cubes)
    bias = et[None, :, None, :] + e_space[None, None]
    if saved is None:
      s, _, xg, inv_sigma = _scores(xc, ag, et, e_space, eps, hq)
    else:
      s = lax.dynamic_slice_in_dim(saved[0], start, cf, 1)
      inv_sigma = lax.dynamic_slice_in_dim(saved[1], start, cf, 1)
      xg = jnp.einsum("bfpv,vw->bfpw", xc, g, preferred_element_type=jnp.float32)   # dx only
    p = jnp.where(use[:, :, None, None], jnp.exp(s - _rows(lse, cid)[:, :, None]), 0.0)
    dyf = _rows(dy, cid).astype(x.dtype)                                     # [B, cf, HQ, Dv]
    dp = jnp.einsum("bfpv,bfhv->bfph", xc, dyf, preferred_element_type=jnp.float32)
    dp = dp * inv_sigma[..., None]
    ds = p * (dp - _rows(delta, cid)[:, :, None])
    dsigma = -(jnp.einsum("bfph,bfph->bfp", ds, s - bias)
               + jnp.einsum("bfph,bfph->bfp", p, dp)) * inv_sigma
    ds_raw = ds * inv_sigma[..., None]
    rhs = jnp.concatenate([ds_raw, xc * (0.5 * dsigma * inv_sigma)[..., None]], axis=-1)
    dag = dag + jnp.einsum("bfpv,bfpk->vk", xc, rhs.astype(x.dtype), preferred_element_type=jnp.float32)
    ds_frame = ds.sum(axis=(0, 2))
    de_time = lax.dynamic_update_slice_in_dim(
        de_time, lax.dynamic_slice_in_dim(de_time, start, cf, 0) + ds_frame, start, 0)
    de_space = de_space + ds                                   # reduced over (B, cf) after the loop
    dxc = (jnp.einsum("bfph,vh->bfpv", ds_raw.astype(x.dtype), a, preferred_element_type=jnp.float32)
           + jnp.einsum("bfph,bfhv->bfpv", (p * inv_sigma[..., None]).astype(x.dtype), dyf,
                        preferred_element_type=jnp.float32)
           + (dsigma * inv_sigma)[..., None] * xg)
    dx = lax.dynamic_update_slice_in_dim(
        dx, lax.dynamic_slice_in_dim(dx, start, cf, 1) + dxc.astype(dx.dtype), start, 1)
    return dx, dag, de_time, de_space

  init = (jnp.zeros_like(x), jnp.zeros((dv, hq + dv), jnp.float32),
          jnp.zeros((frames, hq), jnp.float32), jnp.zeros((x.shape[0], cf, tokens, hq), jnp.float32))
  dx, dag, de_time, de_space = lax.fori_loop(0, -(-frames // cf), chunk, init)
  de_space = de_space.sum(axis=(0, 1))
  return (dx, dag[:, :hq].astype(a.dtype), dag[:, hq:].astype(g.dtype),
          de_time.astype(e_time.dtype), de_space.astype(e_space.dtype), None, None)


segment_attention.defvjp(_segment_attention_fwd, _segment_attention_bwd)


@functools.partial(jax.jit, static_argnames=("num_cubes", "num_heads", "grid_size", "eps", "temperature",
                                             "dtype", "token_chunk", "save_scores", "context"))
def attend_fast(w, x: jax.Array, cube_ids: jax.Array, frame_valid: jax.Array,
                frame_positions: jax.Array, *, num_cubes: int, num_heads: int, grid_size: int,
                eps: float, temperature: float, dtype, token_chunk: int,
                save_scores: bool = True, context: int = 1) -> jax.Array:
  """Same contract as `attend_plain`: [B, K, Q, D] fp32 attention output before out_proj. (Jitted so
  that eager calls compile once; inside a trace it is inlined.) context > 1: the frames are split over
  the mesh's `context` axis (qv_jax/parallel/context_resampler.py)."""
  b, f, p, dv = x.shape
  d = w.wkv.shape[1]
  h, dh = num_heads, d // num_heads
  wc = w.wkv - w.wkv.mean(axis=1, keepdims=True)                             # [Dv, D]
  g = jnp.matmul(wc, wc.T, precision=_HI) / d
  q = scaled_queries(w, num_heads, eps)                                      # [Q, H, dh]
  nq = q.shape[0]
  qt = jnp.einsum("dhe,qhe->hqd", w.wk.reshape(d, h, dh), q, precision=_HI).reshape(h * nq, d)
  a = jnp.matmul(wc, (qt * w.ln_kv_scale).T, precision=_HI)                 # [Dv, HQ]
  time_pe, space_pe = sincos_3d_parts(d, frame_positions, grid_size, temperature)
  d_time = time_pe.shape[-1]
  e_time = jnp.matmul(time_pe, qt[:, :d_time].T, precision=_HI)              # [F, HQ]
  e_space = jnp.matmul(space_pe, qt[:, d_time:].T, precision=_HI)            # [P, HQ]
  cf = frames_per_chunk(f // context, max(1, token_chunk // p))
  args = (x.astype(dtype), a.astype(dtype), g.astype(dtype), e_time, e_space, cube_ids.astype(jnp.int32),
          frame_valid, num_cubes, cf, float(eps))
  if context > 1:
    from qv_jax.parallel.context_resampler import context_segment_attention
    y = context_segment_attention(*args)
  else:
    y = segment_attention(*args, bool(save_scores))
  bmat = jnp.matmul(wc * w.ln_kv_scale, w.wv, precision=_HI).reshape(dv, h, dh)
  const = jnp.matmul(w.ln_kv_bias, w.wv, precision=_HI) + w.bv
  out = jnp.einsum("bkhqv,vhe->bkqhe", y.reshape(b, num_cubes, h, nq, dv).astype(dtype),
                   bmat.astype(dtype), preferred_element_type=jnp.float32)
  return out.reshape(b, num_cubes, nq, d) + const


def fast_flops(*, batch: int, frames: int, tokens: int, vision_dim: int, embed_dim: int,
               num_heads: int, num_queries: int, num_cubes: int, token_chunk: int,
               backward: bool = True, feature_grad: bool = False,
               save_scores: bool = True) -> dict[str, float]:
  """Analytic matmul FLOPs of one compressor step with the fast resampler (2 per multiply-add).

  Per token: forward [Dv, HQ+Dv] scores/σ + [HQ, Dv] weighted sum; backward: x·dY, the [Dv, HQ+Dv]
  weight gradients, the score recompute unless save_scores, and (feature_grad) 2 [HQ, Dv] products for
  dx plus x·G when the scores were saved.
  Fixed: the query-side precompute (G, q̃, Ã, B, position tables), the per-cube output projections,
  the cubing MLP and the thumbnail; their backward is counted as twice their forward."""
  dv, d, hq = vision_dim, embed_dim, num_heads * num_queries
  cf = frames_per_chunk(frames, max(1, token_chunk // tokens))
  t = batch * (-(-frames // cf)) * cf * tokens
  fwd_tok = 2 * dv * (hq + dv) + 2 * hq * dv
  bwd_tok = 2 * dv * hq + 2 * dv * (hq + dv) + (0 if save_scores else 2 * dv * (hq + dv))
  if feature_grad:
    bwd_tok += 4 * hq * dv + (2 * dv * dv if save_scores else 0)
  pre = (2 * dv * dv * d + 2 * 2 * num_queries * d * d + 2 * dv * d * hq + 2 * dv * d * d
         + 2 * (frames * d // 4 + tokens * 3 * d // 4) * hq)
  post = batch * num_cubes * num_queries * (2 * dv * d + 2 * 2 * d * d)
  small = batch * (frames - 1) * 2 * (2 * dv * dv + 2 * dv) + batch * (tokens // 9) * 2 * dv * d
  fixed = pre + post + small
  out = {"tokens": float(t), "forward": float(t * fwd_tok + fixed)}
  out["backward"] = float(t * bwd_tok + 2 * fixed) if backward else 0.0
  out["total"] = out["forward"] + out["backward"]
  return out
