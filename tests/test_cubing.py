"""Cubing network, cube counts, Gumbel top-k / uniform partitions, thumbnail, aux term, η schedule."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from configs.quicksviewer import get_config
from qv_jax.config import validate
from qv_jax.model import gumbel
from qv_jax.model.compressor import Compressor, gumbel_noise_weight, max_cubes, num_cubes
from qv_jax.model.cubing import Cubing, aux_norm_loss, momentum, pool_tokens, thumbnail_features

F = 16        # frame bucket of these tests (tiny config: P = 36, Dv = 32, D = 64)


def tiny_config(**compressor):
  config = get_config("size=tiny")
  for k, v in compressor.items():
    config.model.compressor[k] = v
  return config


@functools.lru_cache(maxsize=None)
def model_and_step(partition="gumbel"):
  """A tiny Compressor and ONE jitted forward reused by the tests (compiled once per partition)."""
  model = Compressor(validate(tiny_config(partition=partition)).model.compressor, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, features, num_frames, key, eta, sample_ids):
    return nnx.merge(graphdef, state).compress(features, num_frames, key, eta, sample_ids)

  return model, state, forward


def features(seed, batch=3, frames=F):
  return jax.random.normal(jax.random.key(seed), (batch, frames, 36, 32), jnp.float32)


def test_num_cubes_matches_reference_formula():
  for n, want in [(2, 2), (12, 2), (13, 3), (60, 12), (420, 84), (480, 96)]:
    assert num_cubes(n) == want
  counts = np.arange(2, 600)
  ref = np.array([max(round(n / 5) - 1, 1) + 1 for n in counts])
  np.testing.assert_array_equal(num_cubes(counts), ref)
  np.testing.assert_array_equal(np.asarray(num_cubes(jnp.asarray(counts))), ref)
  np.testing.assert_array_equal(num_cubes(counts, 3), [max(round(n / 3) - 1, 1) + 1 for n in counts])
  assert max_cubes(420) == 84 and max_cubes(16) == 3 and max_cubes(16, 2) == 8


def test_noise_weight_schedule():
  total = 1000                                                # M = 600
  eta = lambda s: float(gumbel_noise_weight(s, total))
  assert eta(0) == pytest.approx(1.0)
  assert eta(300) == pytest.approx(0.01 + 0.99 * 0.5, rel=1e-6)
  assert eta(600) == pytest.approx(0.01, abs=1e-7)
  assert eta(601) == pytest.approx(0.01) and eta(10_000) == pytest.approx(0.01)
  steps = jnp.arange(0, 601)
  values = np.asarray(jax.jit(lambda s: gumbel_noise_weight(s, total))(steps))
  np.testing.assert_allclose(values, 0.01 + 0.99 * (1 + np.cos(np.pi * np.arange(601) / 600)) / 2, rtol=1e-5)
  assert np.all(np.diff(values) <= 0)
  assert float(gumbel_noise_weight(5, 100, eta_max=2.0, eta_min=0.5, fraction=0.1)) == pytest.approx(1.25)


def test_momentum_matches_recurrence():
  x = np.random.default_rng(0).normal(size=(2, 9, 5)).astype(np.float32)
  for alpha in (0.8, 0.3):
    m = [x[:, 1] - x[:, 0]]
    for t in range(2, 9):
      m.append(alpha * (x[:, t] - x[:, t - 1]) + (1 - alpha) * m[-1])
    np.testing.assert_allclose(np.asarray(momentum(jnp.asarray(x), alpha)), np.stack(m, 1), rtol=1e-5, atol=1e-6)


def test_cubing_logits_equal_per_token_order():
  """Reference order: momentum per token, agg per token, mean over tokens, LN, fc1, exact GELU, fc2."""
  cubing = Cubing(8, alpha=0.8, layer_norm_eps=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                  rngs=nnx.Rngs(2))
  v = np.random.default_rng(1).normal(size=(1, 6, 10, 8))
  p = lambda mod: np.asarray(mod.get_value(), np.float64)
  m = [v[:, 1] - v[:, 0]]
  for t in range(2, 6):
    m.append(0.8 * (v[:, t] - v[:, t - 1]) + 0.2 * m[-1])
  h = (np.stack(m, 1) @ p(cubing.agg.kernel) + p(cubing.agg.bias)).mean(2)
  h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
  h = (h * p(cubing.norm.scale) + p(cubing.norm.bias)) @ p(cubing.fc1.kernel) + p(cubing.fc1.bias)
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))
  z = h @ p(cubing.fc2.kernel) + p(cubing.fc2.bias)
  got = cubing(jnp.asarray(v.mean(2), jnp.float32))
  np.testing.assert_allclose(np.asarray(got), z, rtol=1e-4, atol=1e-5)


def check_partition(out, counts, fpq=5):
  """k_b + 1 cubes per sample, contiguous, starting at frame 0, covering exactly the valid frames."""
  boundary = np.asarray(out.boundary)
  ids, mask, start = (np.asarray(a) for a in (out.cube_ids, out.cube_mask, out.cube_start))
  assert set(np.unique(boundary)) <= {0.0, 1.0}
  for b, n in enumerate(counts):
    k1 = max(round(n / fpq) - 1, 1) + 1
    assert boundary[b, 0] == 1.0
    assert boundary[b, n:].sum() == 0, "a padded frame was selected"
    assert boundary[b, :n].sum() == k1 == mask[b].sum()
    assert mask[b, :k1].all()
    starts = np.flatnonzero(boundary[b, :n])
    np.testing.assert_array_equal(start[b, :k1], starts)
    assert (start[b, k1:] == 0).all()
    ends = np.append(starts[1:], n)
    assert (ends > starts).all() and starts[0] == 0 and ends[-1] == n
    np.testing.assert_array_equal(ids[b, :n], np.repeat(np.arange(k1), ends - starts))
    assert np.asarray(out.logit_mask)[b].sum() == n - 1


@settings(max_examples=20, deadline=None)
@given(counts=st.lists(st.integers(2, F), min_size=3, max_size=3), seed=st.integers(0, 2**16),
       eta=st.sampled_from([0.0, 0.3, 1.0]), partition=st.sampled_from(["gumbel", "uniform"]))
def test_partition_invariants(counts, seed, eta, partition):
  model, state, forward = model_and_step(partition)
  out = forward(state, features(seed), jnp.asarray(counts, jnp.int32), jax.random.key(seed), eta,
                jnp.arange(3, dtype=jnp.int32))
  check_partition(out, counts)
  assert out.cube_tokens.shape == (3, max_cubes(F), 4, 64) and out.thumbnail.shape == (3, 4, 64)
  assert not np.asarray(out.cube_tokens)[~np.asarray(out.cube_mask)].any()


def test_uniform_placement():
  model, state, forward = model_and_step("uniform")
  counts = [16, 13, 7]
  out = forward(state, features(0), jnp.asarray(counts, jnp.int32), jax.random.key(0), 1.0,
                jnp.arange(3, dtype=jnp.int32))
  for b, n in enumerate(counts):
    k1 = num_cubes(n)
    np.testing.assert_array_equal(np.asarray(out.cube_start[b, :k1]), [j * n // k1 for j in range(k1)])
  h = gumbel.uniform_boundaries(jnp.asarray([60]), jnp.asarray([11]), 59, 11)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(h[0])) + 1, np.arange(5, 60, 5))


def test_eta_zero_is_deterministic_and_noise_moves_boundaries():
  model, state, forward = model_and_step()
  x, n, ids = features(3), jnp.asarray([16, 16, 14], jnp.int32), jnp.arange(3, dtype=jnp.int32)
  runs = [forward(state, x, n, jax.random.key(s), 0.0, ids).boundary for s in range(4)]
  for r in runs[1:]:
    np.testing.assert_array_equal(np.asarray(r), np.asarray(runs[0]))
  noisy = {np.asarray(forward(state, x, n, jax.random.key(s), 5.0, ids).boundary).tobytes() for s in range(6)}
  assert len(noisy) > 1


def test_per_sample_noise_ignores_batch_layout():
  model, state, forward = model_and_step()
  x = features(4)
  full = forward(state, x, jnp.asarray([16, 12, 15], jnp.int32), jax.random.key(9), 1.0,
                 jnp.asarray([5, 6, 7], jnp.int32))
  swapped = forward(state, x[::-1], jnp.asarray([15, 12, 16], jnp.int32), jax.random.key(9), 1.0,
                    jnp.asarray([7, 6, 5], jnp.int32))
  np.testing.assert_array_equal(np.asarray(full.boundary), np.asarray(swapped.boundary)[::-1])
  np.testing.assert_allclose(np.asarray(full.cube_tokens), np.asarray(swapped.cube_tokens)[::-1], atol=1e-6)


def test_padded_frames_change_nothing():
  model, state, forward = model_and_step()
  counts = jnp.asarray([9, 16, 2], jnp.int32)
  x = features(5)
  junk = features(6) * 100.0
  pad = (jnp.arange(F)[None, :, None, None] >= counts[:, None, None, None])
  y = jnp.where(pad, junk, x)
  y = y.at[2, 5].set(jnp.nan).at[0, 12].set(jnp.inf)       # even non-finite padding is ignored
  args = (jax.random.key(1), 0.7, jnp.arange(3, dtype=jnp.int32))
  a, b = forward(state, x, counts, *args), forward(state, y, counts, *args)
  for name in ("thumbnail", "cube_tokens", "cube_mask", "cube_start", "boundary", "aux_loss"):
    np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), err_msg=name)
  mask = np.asarray(a.logit_mask)
  np.testing.assert_array_equal(np.asarray(a.logits)[mask], np.asarray(b.logits)[mask])

  def loss(state, feats):
    out = nnx.merge(*nnx.split(model)[:1], state).compress(feats, counts, *args)
    return jnp.sum(out.cube_tokens ** 2) + jnp.sum(out.thumbnail) + out.aux_loss

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  (ga, gfa), (gb, gfb) = grad(state, x), grad(state, y)
  for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  assert not np.asarray(gfb)[np.asarray(pad)[..., 0, 0]].any()
  np.testing.assert_array_equal(np.asarray(gfa)[~np.asarray(pad)[..., 0, 0]],
                                np.asarray(gfb)[~np.asarray(pad)[..., 0, 0]])


def test_straight_through_is_exact_forward_and_has_the_gradient_of_p():
  z = jax.random.normal(jax.random.key(0), (2, 7, 2))
  mask = jnp.arange(7)[None] < jnp.asarray([[7], [4]])
  inner = jnp.asarray([2, 1])
  w = jax.random.normal(jax.random.key(1), (2, 7))

  def zhat(z):
    p = gumbel.boundary_probs(z, None, 0.0, 0.5)
    hard = gumbel.topk_boundaries(jax.lax.stop_gradient(p), mask, inner, 2)
    return gumbel.straight_through(hard, p, mask)

  out = zhat(z)
  p = gumbel.boundary_probs(z, None, 0.0, 0.5)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(gumbel.topk_boundaries(p, mask, inner, 2)))
  assert set(np.unique(np.asarray(out))) == {0.0, 1.0}
  assert np.asarray(out).sum(1).tolist() == [2.0, 1.0]
  # the top-k of p: rows with the largest p among the valid ones
  for b, k in enumerate([2, 1]):
    valid = np.asarray(p[b])[: int(mask[b].sum())]
    assert set(np.flatnonzero(np.asarray(out[b]))) == set(np.argsort(-valid)[:k])
  g_st = jax.grad(lambda z: jnp.sum(zhat(z) * w))(z)
  g_p = jax.grad(lambda z: jnp.sum(jnp.where(mask, gumbel.boundary_probs(z, None, 0.0, 0.5), 0) * w))(z)
  np.testing.assert_allclose(np.asarray(g_st), np.asarray(g_p), rtol=1e-6)
  assert np.abs(np.asarray(g_st)[1, 4:]).sum() == 0


def cubing_grads(partition, output):
  model, state, _ = model_and_step(partition)
  graphdef = nnx.split(model)[0]
  x, n = features(7), jnp.asarray([16, 11, 14], jnp.int32)
  r = jax.random.normal(jax.random.key(3), (3, max_cubes(F), 4, 64))

  def loss(state):
    out = nnx.merge(graphdef, state).compress(x, n, jax.random.key(2), 0.5, jnp.arange(3, dtype=jnp.int32))
    return {"tokens": jnp.sum(out.cube_tokens * r), "thumbnail": jnp.sum(out.thumbnail ** 2),
            "aux": out.aux_loss}[output]

  grads = jax.jit(jax.grad(loss))(state)
  return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)}


def test_gradient_reaches_cubing_only_through_thumbnail_and_aux():
  cubing = lambda g: {k: v for k, v in g.items() if k.startswith("cubing/")}
  tokens = cubing_grads("gumbel", "tokens")
  assert len(cubing(tokens)) == 8 and all(not v.any() for v in cubing(tokens).values())
  thumb = cubing_grads("gumbel", "thumbnail")
  assert all(np.abs(v).sum() > 0 for v in cubing(thumb).values())
  assert all(np.abs(v).sum() > 0 for v in cubing(cubing_grads("gumbel", "aux")).values())
  # resampler params get the token gradient, not the thumbnail's
  assert np.abs(tokens["resampler/kv_proj/kernel"]).sum() > 0
  assert not thumb["resampler/kv_proj/kernel"].any()
  # the uniform baseline ignores the logits: only the aux term trains the cubing network
  assert all(not v.any() for v in cubing(cubing_grads("uniform", "thumbnail")).values())


def test_thumbnail_is_mean_of_boundary_frames_pooled_by_nine():
  v = np.random.default_rng(2).normal(size=(2, 5, 18, 3)).astype(np.float32)
  w = np.array([[1, 0, 1, 0, 1], [1, 1, 0, 0, 0]], np.float32)
  pooled = pool_tokens(jnp.asarray(v), 9)
  np.testing.assert_allclose(np.asarray(pooled), v.reshape(2, 5, 2, 9, 3).mean(3), rtol=1e-6)
  got = np.asarray(thumbnail_features(pooled, jnp.asarray(w)))
  mean = (v * w[:, :, None, None]).sum(1) / w.sum(1)[:, None, None]
  np.testing.assert_allclose(got, mean.reshape(2, 2, 9, 3).mean(2), rtol=1e-6)
  # the weight sum is a constant for the gradient: ∂T/∂w_t = pool(V_t) / S
  g = jax.grad(lambda w: thumbnail_features(pooled, w)[0, 0, 0])(jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(g[0]), v[0, :, :9, 0].mean(1) / 3, rtol=1e-5)


def test_aux_loss_mean_norm_over_valid_rows():
  z = np.random.default_rng(3).normal(size=(2, 4, 2)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
  want = np.linalg.norm(z, axis=-1)[mask].mean()
  assert float(aux_norm_loss(jnp.asarray(z), jnp.asarray(mask))) == pytest.approx(want, rel=1e-6)
  assert float(aux_norm_loss(jnp.asarray(z), jnp.zeros((2, 4), bool))) == 0.0
  g = jax.grad(lambda z: aux_norm_loss(z, jnp.ones((1, 2), bool)))(jnp.zeros((1, 2, 2)))
  assert np.isfinite(np.asarray(g)).all()
