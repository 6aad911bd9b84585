"""Ring attention over the `context` axis (zig-zag layout) equals single-device attention: values and
gradients, GQA, packed segments, padding, tensor-split heads; the whole decoder with
`context_attention="ring"` equals the unsharded one; bad lengths and modes are one line."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.quicksviewer import get_config
from qv_jax.config import ConfigError, validate
from qv_jax.model.attention import attend
from qv_jax.model.decoder import Decoder
from qv_jax.parallel.ring_attention import (allgather_attention, from_zigzag, ring_attention, to_zigzag,
                                            uses_ring, zigzag_order)
from qv_jax.sharding import SLOT_AXES, axis_rules, make_mesh, state_shardings

B, L, H, KV, HD = 2, 64, 6, 2, 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(**sizes):
  sizes = {**dict(data=1, fsdp=1, context=1, tensor=1), **sizes}
  return make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])


def _inputs(seed=0):
  r = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(r.normal(size=(B, L, n, HD)), jnp.float32) for n in (H, KV, KV))
  valid = np.ones((B, L), bool)
  valid[0, :5] = False             # leading padding: queries that see no key at all
  valid[1, 41:] = False            # trailing padding
  valid[1, 17] = False             # a hole
  seg = np.zeros((B, L), np.int32)
  seg[0, 21:], seg[0, 50:], seg[1, 30:] = 1, 2, 1     # segments straddle the zig-zag chunks
  return q, k, v, jnp.asarray(valid), jnp.asarray(seg)


def _weighted_sum(out):
  w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape) * 0.37)
  return (out * w).sum()


def _value_and_grads(fn, q, k, v):
  """(out, weighted sum, its gradients wrt q, k, v), one jitted program."""
  def loss(q, k, v):
    out = fn(q, k, v)
    return _weighted_sum(out), out
  (total, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, total, grads


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("c", [4, 8])
def test_zigzag_layout_and_its_inverse(c):
  x = jnp.tile(jnp.arange(L, dtype=jnp.int32)[None], (B, 1))
  with jax.set_mesh(_mesh(context=c)):
    z = jax.jit(lambda x: to_zigzag(x, SLOT_AXES))(x)
    back = jax.jit(lambda z: from_zigzag(z, SLOT_AXES))(z)
  order = zigzag_order(L, c)
  np.testing.assert_array_equal(np.asarray(z)[0], order)
  n = L // (2 * c)
  chip1 = order[L // c:2 * L // c]                  # chip 1 holds chunks 1 and 2C-2
  np.testing.assert_array_equal(chip1, np.r_[n:2 * n, (2 * c - 2) * n:(2 * c - 1) * n])
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


CASES = [(ring_attention, dict(context=4, data=2), True), (ring_attention, dict(context=8), False),
         (ring_attention, dict(context=4, tensor=2), True), (allgather_attention, dict(context=4, data=2), True)]


@pytest.mark.parametrize("fn,sizes,packed", CASES, ids=["ring-context4-data2-segments", "ring-context8",
                                                        "ring-context4-tensor2", "allgather-context4-data2-segments"])
def test_context_attention_equals_single_device(fn, sizes, packed):
  q, k, v, valid, seg = _inputs()
  seg = seg if packed else None
  slots = jnp.arange(L, dtype=jnp.int32)
  want, want_total, want_g = _value_and_grads(lambda q, k, v: attend(q, k, v, slots, valid, segment_ids=seg),
                                              q, k, v)
  with jax.set_mesh(_mesh(**sizes)):
    got, got_total, got_g = _value_and_grads(lambda q, k, v: fn(q, k, v, valid, seg), q, k, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  assert abs(float(got_total) - float(want_total)) <= 1e-5 * max(1.0, abs(float(want_total)))
  for name, a, b in zip("qkv", got_g, want_g):
    assert _rel(a, b) < 1e-5, (name, _rel(a, b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_ring_rejects_a_length_not_divisible_by_twice_the_context():
  q, k, v, valid, _ = _inputs()
  cut = L - 4                                      # 60: divisible by 4, not by 2 x 4
  with jax.set_mesh(_mesh(context=4)), pytest.raises(ValueError) as e:
    jax.jit(lambda q, k, v, m: ring_attention(q, k, v, m))(q[:, :cut], k[:, :cut], v[:, :cut], valid[:, :cut])
  assert "\n" not in str(e.value) and "60" in str(e.value) and "2 x context = 8" in str(e.value)


def test_config_field_and_sequence_length_are_checked():
  c = get_config("size=tiny,stage=3")
  c.model.decoder.context_attention = "ulysses"
  with pytest.raises(ConfigError, match=r"model\.decoder\.context_attention.*'ulysses'"):
    validate(c)
  c = get_config("size=tiny,stage=3")
  assert c.model.decoder.context_attention == "auto"
  c.model.decoder.context_attention = "ring"
  c.mesh.data, c.mesh.context = 1, 4
  c.data.max_seq_len = 4 * 129                     # a multiple of 4, not of 8
  with pytest.raises(ConfigError, match=r"data\.max_seq_len.*2 x the context axis size 4") as e:
    validate(c)
  assert "\n" not in str(e.value)
  for mode in ("allgather", "auto"):               # auto: the all-gather for this length
    c.model.decoder.context_attention = mode
    validate(c)


def test_auto_takes_the_ring_where_the_length_allows():
  with jax.set_mesh(_mesh(context=4)):
    assert uses_ring("auto", None, 64) and uses_ring("ring", None, 64)
    assert not uses_ring("auto", None, 60) and not uses_ring("allgather", None, 64)
    assert not uses_ring("ring", object(), 64)      # a KV cache: the all-gather
  with jax.set_mesh(_mesh(data=8)):
    assert not uses_ring("ring", None, 64)


def _decoder_loss(decoder, ids, positions, mask, seg):
  logits, _ = decoder(input_ids=ids, positions=positions, mask=mask, segment_ids=seg)
  w = jnp.sin(jnp.arange(logits.shape[-1], dtype=jnp.float32))
  return (jnp.where(mask[..., None], logits, 0.0) * w).sum() / 100.0, logits


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ring", "allgather"])
def test_decoder_over_context_4_equals_context_1(mode):
  c = get_config("size=tiny,stage=3")
  c.model.decoder.context_attention = mode
  c.model.compute_dtype = "float32"
  decoder = Decoder(validate(c).model.decoder, rngs=nnx.Rngs(3))
  r = np.random.default_rng(1)
  ids = jnp.asarray(r.integers(0, c.model.decoder.vocab_size, (B, L)), jnp.int32)
  _, _, _, mask, seg = _inputs()
  positions = jnp.asarray(np.where(np.asarray(seg) == 1, np.arange(L) - 21, np.arange(L)), jnp.int32)
  graphdef, state = nnx.split(decoder)

  def step(state, ids, positions, mask, seg):
    fn = lambda s: _decoder_loss(nnx.merge(graphdef, s), ids, positions, mask, seg)
    (loss, logits), grads = jax.value_and_grad(fn, has_aux=True)(state)
    return loss, logits, grads

  want = step(state, ids, positions, mask, seg)
  mesh = _mesh(context=4, data=2)
  with jax.set_mesh(mesh), axis_rules(c.sharding_rules):
    sharded = jax.device_put(state, state_shardings(state, mesh))
    compiled = jax.jit(step).lower(sharded, ids, positions, mask, seg).compile()
    got = jax.device_get(compiled(sharded, ids, positions, mask, seg))
  assert ("collective-permute" in compiled.as_text()) == (mode == "ring")    # the ring ran, or did not
  m = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(got[1])[m], np.asarray(want[1])[m], atol=1e-5, rtol=1e-5)
  assert abs(float(got[0]) - float(want[0])) <= 1e-5 * max(1.0, abs(float(want[0])))
  for (path, a), (_, b) in zip(nnx.to_flat_state(got[2]), nnx.to_flat_state(want[2])):
    a, b = a.get_value(), b.get_value()
    assert _rel(a, b) < 1e-5, (path, _rel(a, b))


@pytest.mark.parametrize("module", ["qv_jax.model.decoder", "qv_jax.parallel.context"])
def test_modules_import_first_in_a_fresh_interpreter(module):
  # qv_jax.parallel.context and qv_jax.config import each other; neither may be the first import
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  done = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]
