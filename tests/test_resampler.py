"""The 3D resampler: sincos table, segmented attention vs a naive per-cube loop (hypothesis), fast vs
plain (values and gradients), chunking, and one compile across partitions and frame counts."""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from configs.quicksviewer import get_config
from qv_jax.config import validate
from qv_jax.model.compressor import Compressor
from qv_jax.model.resampler import Resampler
from qv_jax.model.resampler_fast import fast_flops, frames_per_chunk
from qv_jax.model.sincos import sincos_3d, sincos_3d_parts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import CompileCounter  # noqa: E402

DV, D, H, Q, GRID = 32, 64, 4, 4, 6
P = GRID * GRID
F, KMAX = 11, 5


def sincos_np(d, positions, grid):
  def one(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    ang = np.asarray(pos, np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)
  t, r, c = np.meshgrid(positions, np.arange(grid), np.arange(grid), indexing="ij")
  return np.concatenate([one(d // 4, t.ravel()), one(3 * d // 8, r.ravel()), one(3 * d // 8, c.ravel())],
                        1).reshape(len(positions), grid * grid, d)


def test_sincos_table():
  pos = np.array([0, 1, 7, 419])
  np.testing.assert_allclose(np.asarray(sincos_3d(64, jnp.asarray(pos), 6)), sincos_np(64, pos, 6), atol=2e-6)
  np.testing.assert_allclose(np.asarray(sincos_3d(3584, jnp.arange(3), 24)), sincos_np(3584, np.arange(3), 24),
                             atol=2e-6)
  time, space = sincos_3d_parts(3584, jnp.arange(3), 24)
  assert time.shape == (3, 896) and space.shape == (576, 2688)
  with pytest.raises(ValueError, match="multiple of 16|D % 16"):
    sincos_3d(40, jnp.arange(2), 6)


def make_resampler(impl="fast", token_chunk=5 * P, save_scores=True, dtype=jnp.float32, seed=0):
  r = Resampler(DV, D, num_heads=H, num_queries=Q, grid_size=GRID, layer_norm_eps=1e-6,
                pos_temperature=1e4, impl=impl, token_chunk=token_chunk, save_scores=save_scores,
                dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 100), 16))
  r.query.set_value(jax.random.normal(next(keys), (Q, D)))
  for ln in (r.ln_q, r.ln_kv, r.ln_post):
    ln.scale.set_value(1 + 0.3 * jax.random.normal(next(keys), (D,)))
    ln.bias.set_value(0.3 * jax.random.normal(next(keys), (D,)))
  for lin in (r.q_proj, r.k_proj, r.v_proj, r.out_proj):
    lin.bias.set_value(0.2 * jax.random.normal(next(keys), (D,)))
  return r


def naive_resampler(r, x, frames):
  """Ordinary multi-head attention for ONE cube: x [n, P, Dv] at absolute frame indices `frames`."""
  p = lambda v: np.asarray(v.get_value(), np.float64)
  ln = lambda v, m: (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6) * p(m.scale) + p(m.bias)
  kv = ln(x.reshape(-1, DV).astype(np.float64) @ p(r.kv_proj.kernel), r.ln_kv)
  k = (kv + sincos_np(D, frames, GRID).reshape(-1, D)) @ p(r.k_proj.kernel) + p(r.k_proj.bias)
  v = kv @ p(r.v_proj.kernel) + p(r.v_proj.bias)
  q = ln(p(r.query), r.ln_q) @ p(r.q_proj.kernel) + p(r.q_proj.bias)
  heads = []
  for h in range(H):
    sl = slice(h * D // H, (h + 1) * D // H)
    s = q[:, sl] @ k[:, sl].T / np.sqrt(D // H)
    w = np.exp(s - s.max(-1, keepdims=True))
    heads.append((w / w.sum(-1, keepdims=True)) @ v[:, sl])
  out = np.concatenate(heads, -1) @ p(r.out_proj.kernel) + p(r.out_proj.bias)
  return ln(out, r.ln_post) @ p(r.proj)


@functools.lru_cache(maxsize=None)
def jitted(impl):
  r = make_resampler(impl)
  graphdef, state = nnx.split(r)
  run = jax.jit(lambda s, x, ids, valid: nnx.merge(graphdef, s)(x, ids, valid, num_cubes=KMAX))
  return r, lambda *a: run(state, *a)


partitions = st.integers(1, F).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(st.integers(1, n - 1), max_size=KMAX - 1, unique=True)
                        if n > 1 else st.just([])))


@settings(max_examples=12, deadline=None)
@given(parts=st.lists(partitions, min_size=2, max_size=2), seed=st.integers(0, 1000))
def test_segmented_equals_naive_loop_over_cubes(parts, seed):
  x = np.random.default_rng(seed).normal(size=(2, F, P, DV)).astype(np.float32)
  ids = np.zeros((2, F), np.int32)
  valid = np.zeros((2, F), bool)
  bounds = []
  for b, (n, cuts) in enumerate(parts):
    starts = [0] + sorted(cuts)
    ends = starts[1:] + [n]
    bounds.append(list(zip(starts, ends)))
    for c, (s, e) in enumerate(bounds[-1]):
      ids[b, s:e] = c
    ids[b, n:] = seed % KMAX                         # padded frames: any id
    valid[b, :n] = True
  for impl in ("fast", "plain"):
    r, run = jitted(impl)
    out = np.asarray(run(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(valid)))
    for b in range(2):
      for c, (s, e) in enumerate(bounds[b]):
        want = naive_resampler(r, x[b, s:e], np.arange(s, e))
        np.testing.assert_allclose(out[b, c], want, rtol=2e-4, atol=2e-4, err_msg=f"{impl} b={b} cube={c}")


def grads(impl, save_scores, x, ids, valid):
  r = make_resampler(impl, save_scores=save_scores)
  graphdef, state = nnx.split(r)
  cot = jax.random.normal(jax.random.key(7), (x.shape[0], KMAX, Q, D))

  @jax.jit
  def loss(state, x):
    out = nnx.merge(graphdef, state)(x, ids, valid, num_cubes=KMAX)
    return jnp.sum(jnp.where(jnp.arange(KMAX)[None, :, None, None] < 4, out, 0) * cot)

  value, (g_state, g_x) = jax.value_and_grad(loss, argnums=(0, 1))(state, x)
  flat = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(g_state)}
  return float(value), flat, np.asarray(g_x)


def test_fast_equals_plain_values_and_gradients():
  x = jax.random.normal(jax.random.key(1), (2, F, P, DV))
  ids = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 2, 3, 3, 3], [0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 0]], jnp.int32)
  valid = jnp.arange(F)[None] < jnp.asarray([[11], [9]])       # 2 padded frames; cube 4 empty
  value_p, gp, gxp = grads("plain", True, x, ids, valid)
  for save in (True, False):
    value_f, gf, gxf = grads("fast", save, x, ids, valid)
    assert value_f == pytest.approx(value_p, rel=1e-5)
    assert gf.keys() == gp.keys()
    largest = max(np.abs(g).max() for g in gp.values())
    for k in gp:                                      # k_proj/bias: exactly 0 in theory, roundoff in plain
      scale = max(np.abs(gp[k]).max(), 1e-2 * largest)
      np.testing.assert_allclose(gf[k], gp[k], atol=2e-5 * scale, rtol=0, err_msg=k)
    np.testing.assert_allclose(gxf, gxp, atol=2e-5 * np.abs(gxp).max(), rtol=0)
    assert not gxf[1, 9:].any()


def test_bf16_close_to_fp32():
  x = jax.random.normal(jax.random.key(2), (1, F, P, DV))
  ids = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4]], jnp.int32)
  valid = jnp.ones((1, F), bool)
  ref = np.asarray(make_resampler("plain")(x, ids, valid, num_cubes=KMAX))
  for impl in ("fast", "plain"):
    out = make_resampler(impl, dtype=jnp.bfloat16)(x, ids, valid, num_cubes=KMAX)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.06 * np.abs(ref).max())


def test_frames_per_chunk_wastes_least():
  assert frames_per_chunk(60, 8) == 6 and frames_per_chunk(420, 8) == 7 and frames_per_chunk(240, 8) == 8
  assert frames_per_chunk(16, 128) == 16 and frames_per_chunk(5, 1) == 1
  for frames in range(2, 80):
    for cap in (1, 3, 8):
      cf = frames_per_chunk(frames, cap)
      assert 1 <= cf <= min(cap, frames)
      waste = -(-frames // cf) * cf - frames
      assert all(waste <= -(-frames // c) * c - frames for c in range(max(1, cap // 2), min(cap, frames) + 1))


def test_fast_flops_linear_in_frames():
  dims = dict(batch=1, tokens=576, vision_dim=1152, embed_dim=3584, num_heads=28, num_queries=64,
              token_chunk=4608)
  per_token = [(fast_flops(frames=f, num_cubes=1, **dims)["total"] - fast_flops(frames=8, num_cubes=1, **dims)["total"])
               / ((f - 8) * 576) for f in (16, 64, 240)]
  assert max(per_token) / min(per_token) < 1.01
  assert 2.0e7 < per_token[0] < 2.4e7        # ~22 MFLOP per token fwd+bwd at the released size


def test_compiles_once_across_partitions_and_frame_counts():
  config = get_config("size=tiny")
  model = Compressor(validate(config).model.compressor, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, feats, n, key, eta):
    def loss(state):
      out = nnx.merge(graphdef, state).compress(feats, n, key, eta, None)
      return jnp.sum(out.cube_tokens ** 2) + jnp.sum(out.thumbnail) + out.aux_loss, out.boundary
    return jax.value_and_grad(loss, has_aux=True)(state)

  rng = np.random.default_rng(0)
  feats = jnp.asarray(rng.normal(size=(2, 16, 36, 32)).astype(np.float32))
  inputs = [(jnp.asarray(rng.integers(2, 17, size=2), jnp.int32), jax.random.key(i), float(rng.uniform(0, 2)))
            for i in range(20)]
  boundaries = set()
  with CompileCounter() as compiles:
    for n, key, eta in inputs:
      (_, boundary), _ = step(state, feats, n, key, eta)
      boundaries.add(np.asarray(boundary).tobytes())
  assert compiles.count == 1, compiles.names
  assert step._cache_size() == 1
  assert len(boundaries) >= 15                      # the partitions really differed
