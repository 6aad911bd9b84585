"""Decoder parity with HF transformers (through the converter), masks, KV cache, layer scan / remat /
chunked attention equivalence, logical axes and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs.quicksviewer import get_config
from qv_jax import sharding
from qv_jax.config import ConfigError, validate
from qv_jax.config.mesh import LOGICAL_AXIS_RULES
from qv_jax.model.decoder import Decoder
from qv_jax.model.rope import inv_frequencies
from test_decoder_hf_util import forward, hf_config, hf_model, save_and_convert, torch_logits

V = 97


def _ids(shape, seed=0):
  return np.random.RandomState(seed).randint(0, V, shape).astype(np.int32)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  model = hf_model(hf_config("qwen2", kv_heads=2))
  decoder, cfg = save_and_convert(model, tmp_path_factory.mktemp("qwen"))
  return model, decoder, cfg


@pytest.mark.parametrize("scaling", [False, True])
def test_inv_frequencies_match_transformers(scaling):
  model = hf_model(hf_config("llama3", scaling=scaling, hidden=64, heads=4))    # head_dim 16
  scale_cfg = dict(type="llama3", **{k: v for k, v in model.config.rope_parameters.items()
                                     if k not in ("rope_type", "rope_theta")}) if scaling else None
  ours = inv_frequencies(16, 1e4, scale_cfg)
  theirs = model.model.rotary_emb.inv_freq.numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
  if scaling:   # the test config has low, medium and high frequency bands
    plain = inv_frequencies(16, 1e4)
    assert (ours == plain).any() and (ours < plain / 7.9).any()
    assert ((ours != plain) & (ours > plain / 7.9)).any()


CASES = [
    ("qwen2", dict(kv_heads=1, tie=False)),
    ("qwen2", dict(kv_heads=2, tie=True)),
    ("qwen2", dict(kv_heads=4, tie=False)),
    ("llama3", dict(kv_heads=1, tie=False, scaling=True)),
    ("llama3", dict(kv_heads=2, tie=True, scaling=True)),
    ("llama3", dict(kv_heads=2, tie=False, scaling=False)),
]


@pytest.mark.parametrize("family,kw", CASES, ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
                                                   for f, kw in CASES])
def test_logits_match_transformers(family, kw, tmp_path):
  model = hf_model(hf_config(family, **kw), seed=len(str(kw)))
  decoder, cfg = save_and_convert(model, tmp_path)
  assert cfg.decoder.tie_embeddings == kw["tie"] and (decoder.lm_head is None) == kw["tie"]
  assert cfg.decoder.num_kv_heads == kw["kv_heads"]
  ids = _ids((2, 11))
  # Positions past the llama3 band edges (wavelengths 64..256) make the RoPE scaling matter.
  positions = np.stack([np.arange(11), np.arange(11) + 300]).astype(np.int32)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
  out = forward(decoder, ids, positions)
  assert out.dtype == np.float32 and out.shape == (2, 11, V)
  assert np.abs(ref).max() > 1.0   # logits of a size where a wrong mapping shows
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_padding_slots_do_not_change_valid_logits(qwen):
  model, decoder, _ = qwen
  ids = _ids((2, 8), seed=1)
  ref = torch_logits(model, ids)
  # Sequence 0: padding in the middle and at the end; sequence 1: left padding.
  layout = [[1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]]
  mask = np.array(layout, bool)
  padded = np.full(mask.shape, 5, np.int32)
  positions = np.zeros(mask.shape, np.int32)
  for b in range(2):
    padded[b, mask[b]] = ids[b]
    positions[b, mask[b]] = np.arange(8)
    positions[b, ~mask[b]] = 1000 + np.arange((~mask[b]).sum())   # ignored: padding takes no position
  out = forward(decoder, padded, positions, mask)
  for b in range(2):
    np.testing.assert_allclose(out[b, mask[b]], ref[b], atol=1e-4, rtol=0)
  assert np.isfinite(out).all()
  # Changing what sits in the padding slots changes nothing either.
  other = np.where(mask, padded, 17)
  np.testing.assert_allclose(forward(decoder, other, positions, mask)[mask], out[mask], atol=1e-6)


@pytest.mark.parametrize("impl", ["plain", "chunked"])
def test_kv_cache_decoding_matches_full_recompute(qwen, impl, tmp_path):
  model, decoder, _ = qwen
  if impl == "chunked":   # 3-query chunks: the 6-token prefill runs as two chunks over the 16-slot cache
    decoder, _ = save_and_convert(model, tmp_path, attention_impl="chunked", attention_chunk=3)
  ids = _ids((2, 12), seed=2)
  mask = np.ones((2, 12), bool)
  mask[1, :3] = False                                  # sequence 1 has a left-padded prompt
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  full = forward(decoder, ids, positions, mask)
  graphdef, state = nnx.split(decoder)

  @jax.jit
  def step(state, cache, ids, positions, mask):
    return nnx.merge(graphdef, state)(input_ids=ids, positions=positions, mask=mask, cache=cache)

  cache = decoder.init_cache(2, 16)
  got = []
  for start, stop in [(0, 6), (6, 7), (7, 8), (8, 10), (10, 11), (11, 12)]:   # prefill, 1 and 2 at a time
    logits, cache = step(state, cache, ids[:, start:stop], positions[:, start:stop], mask[:, start:stop])
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  assert int(cache.index) == 12
  np.testing.assert_array_equal(np.asarray(cache.valid[:, :12]), mask)
  assert not np.asarray(cache.valid[:, 12:]).any()
  np.testing.assert_array_equal(np.asarray(cache.positions[:, :12])[mask], positions[mask])
  np.testing.assert_allclose(got[mask], full[mask], atol=1e-5, rtol=0)


def test_return_hidden_and_logits_from_hidden(qwen):
  _, decoder, _ = qwen
  ids = jnp.asarray(_ids((2, 5), seed=3))
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  mask = jnp.ones((2, 5), bool)
  hidden, cache = decoder(input_ids=ids, positions=pos, mask=mask, return_hidden=True)
  logits, _ = decoder(input_ids=ids, positions=pos, mask=mask)
  assert cache is None and hidden.shape == (2, 5, 64)
  np.testing.assert_allclose(np.asarray(decoder.logits_from_hidden(hidden)), np.asarray(logits), atol=1e-5)
  embeds = decoder.embed(ids)
  by_embeds, _ = decoder(inputs_embeds=embeds, positions=pos, mask=mask)
  np.testing.assert_allclose(np.asarray(by_embeds), np.asarray(logits), atol=1e-6)


def _tiny_model_config(**decoder_overrides):
  config = get_config("size=tiny")
  config.model.decoder.update(decoder_overrides)
  return validate(config).model.decoder


def _loss_and_grads(model_config, ids):
  decoder = Decoder(model_config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(decoder)
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  mask = jnp.ones(ids.shape, bool).at[1, -3:].set(False)

  def loss(state):
    logits, _ = nnx.merge(graphdef, state)(input_ids=ids, positions=pos, mask=mask)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

  value, grads = jax.jit(jax.value_and_grad(loss))(state)
  return value, jax.tree.leaves(grads)


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(remat_policy="none"),
                                     dict(remat_policy="dots_saveable"),
                                     dict(attention_impl="chunked", attention_chunk=4)])
def test_layer_scan_remat_and_chunked_attention_agree(variant):
  ids = jnp.asarray(_ids((2, 10), seed=4)) % 512
  base_value, base_grads = _loss_and_grads(_tiny_model_config(), ids)
  value, grads = _loss_and_grads(_tiny_model_config(**variant), ids)
  np.testing.assert_allclose(float(value), float(base_value), rtol=1e-5)
  assert len(grads) == len(base_grads)
  for g, b in zip(grads, base_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(b), atol=2e-5, rtol=1e-4)
  assert any(float(jnp.abs(g).max()) > 0 for g in grads)


def test_every_param_has_logical_axes():
  decoder = Decoder(_tiny_model_config(), rngs=nnx.Rngs(0))
  allowed = {name for name, _ in LOGICAL_AXIS_RULES}
  flat = nnx.to_flat_state(nnx.state(decoder))
  assert len(flat) == 15
  for path, var in flat:
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var.get_value().ndim, path
    assert set(axes) <= allowed, (path, axes)
    assert (axes[0] == "layers") == (path[0] == "layers"), (path, axes)
  by_path = {"/".join(map(str, p)): v.get_metadata()["logical_axes"] for p, v in flat}
  assert by_path["layers/self_attn/q_proj/kernel"] == ("layers", "embed", "heads", "head_dim")
  assert by_path["layers/self_attn/k_proj/kernel"] == ("layers", "embed", "kv_heads", "head_dim")
  assert by_path["lm_head/kernel"] == ("embed", "vocab")


def test_sharded_forward_matches_single_device():
  model_config = _tiny_model_config()
  mesh_cfg = dict(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(mesh_cfg)
  factory = lambda: Decoder(model_config, rngs=nnx.Rngs(0))
  sharded = sharding.create_sharded(factory, mesh)
  q_kernel = sharded.layers.self_attn.q_proj.kernel.get_value()
  assert tuple(q_kernel.sharding.spec) == (None, "fsdp", "tensor", None)      # [N, D, H, hd]
  assert tuple(sharded.embed_tokens.embedding.get_value().sharding.spec) == ("tensor", "fsdp")
  ids = jnp.asarray(_ids((4, 8), seed=5)) % 512
  pos = jnp.broadcast_to(jnp.arange(8), ids.shape)
  mask = jnp.ones(ids.shape, bool).at[2, 5:].set(False)
  expected, _ = factory()(input_ids=ids, positions=pos, mask=mask)
  graphdef, state = nnx.split(sharded)

  @jax.jit
  def run(state, ids):
    return nnx.merge(graphdef, state)(input_ids=ids, positions=pos, mask=mask)[0]

  with jax.set_mesh(mesh):
    got = run(state, jax.device_put(ids, sharding.data_sharding(mesh, 2)))
  assert got.sharding.spec[0] == ("data", "fsdp") and got.sharding.spec[2] == "tensor"
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5)


def test_bf16_compute_tracks_fp32(qwen, tmp_path):
  model, decoder, _ = qwen
  bf16, _ = save_and_convert(model, tmp_path, compute_dtype="bfloat16")
  ids = _ids((2, 9), seed=6)
  ref, out = forward(decoder, ids), forward(bf16, ids)
  assert out.dtype == np.float32
  assert bf16.layers.self_attn.q_proj.kernel.get_value().dtype == jnp.float32     # master params fp32
  assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()
  assert np.abs(out - ref).max() > 0      # the bf16 path really ran in bf16


def test_bad_inputs_are_refused(qwen):
  _, decoder, _ = qwen
  ids = jnp.zeros((2, 4), jnp.int32)
  pos = jnp.zeros((2, 4), jnp.int32)
  mask = jnp.ones((2, 4), bool)
  with pytest.raises(ValueError, match="exactly one"):
    decoder(input_ids=ids, inputs_embeds=decoder.embed(ids), positions=pos, mask=mask)
  with pytest.raises(ValueError, match=r"\[B, L\]"):
    decoder(input_ids=ids, positions=pos[:, :3], mask=mask)


@pytest.mark.parametrize("field,value", [("remat_policy", "all"), ("attention_impl", "flash"),
                                         ("num_kv_heads", 3), ("head_dim", 15)])
def test_bad_decoder_config_names_the_field(field, value):
  config = get_config("size=tiny")
  config.model.decoder[field] = value
  with pytest.raises(ConfigError, match=f"model.decoder.{field}"):
    validate(config)
