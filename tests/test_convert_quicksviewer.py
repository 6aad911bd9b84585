"""The full Quicksviewer checkpoint layout (SPEC §8), decoder-only and combined conversions, the CLI,
vocabulary resizing, and the errors for missing / extra / mis-shaped tensors."""

import json
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

from configs.quicksviewer import get_config
from qv_jax.convert.cli import convert, main
from qv_jax.convert.layouts import detect_layout
from qv_jax.convert.mapping import MappingError
from qv_jax.convert.vocab import resize_vocab_rows
from qv_jax.convert.writer import converted_params, load_converted
from qv_jax.model.vision_tower import SiglipVisionTower

TINY = get_config("size=tiny").model
V, D = TINY.vision, TINY.decoder
Q = TINY.compressor.num_queries
QV_VISION = "model.vision_tower.vision_tower.vision_model."


def siglip_config():
  return transformers.SiglipVisionConfig(
      hidden_size=V.hidden_size, intermediate_size=V.intermediate_size, num_hidden_layers=V.num_layers,
      num_attention_heads=V.num_heads, image_size=V.image_size, patch_size=V.patch_size)


def qwen_config(vocab=D.vocab_size):
  return transformers.Qwen2Config(
      vocab_size=vocab, hidden_size=D.hidden_size, intermediate_size=D.intermediate_size,
      num_hidden_layers=D.num_layers, num_attention_heads=D.num_heads, num_key_value_heads=D.num_kv_heads,
      rope_theta=D.rope_theta, rms_norm_eps=D.rms_norm_eps, tie_word_embeddings=False,
      bos_token_id=None, eos_token_id=None, pad_token_id=None)


def randomize(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def compressor_tensors(dv=V.hidden_size, d=D.hidden_size, q=Q, seed=0):
  """The resampler and cubing tensors of SPEC §8, PyTorch layouts, random."""
  g = torch.Generator().manual_seed(seed)
  shapes = {
      "model.vision_resampler.query": (q, d), "model.vision_resampler.kv_proj.weight": (d, dv),
      "model.vision_resampler.attn.in_proj_weight": (3 * d, d),
      "model.vision_resampler.attn.in_proj_bias": (3 * d,),
      "model.vision_resampler.attn.out_proj.weight": (d, d), "model.vision_resampler.attn.out_proj.bias": (d,),
      "model.vision_resampler.proj": (d, d),
      "model.cubing.agg_frame_fn.0.weight": (dv, dv), "model.cubing.agg_frame_fn.0.bias": (dv,),
      "model.cubing.proj_fn.0.weight": (dv,), "model.cubing.proj_fn.0.bias": (dv,),
      "model.cubing.proj_fn.1.weight": (dv, dv), "model.cubing.proj_fn.1.bias": (dv,),
      "model.cubing.proj_fn.3.weight": (2, dv), "model.cubing.proj_fn.3.bias": (2,),
      "model.cubing.thumbnail_fn.1.weight": (d, dv), "model.cubing.thumbnail_fn.1.bias": (d,),
  }
  for ln in ("ln_q", "ln_kv", "ln_post"):
    shapes[f"model.vision_resampler.{ln}.weight"] = (d,)
    shapes[f"model.vision_resampler.{ln}.bias"] = (d,)
  return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def quicksviewer_state_dict(seed=0):
  siglip = randomize(transformers.SiglipVisionModel(siglip_config()), seed)
  qwen = randomize(transformers.Qwen2ForCausalLM(qwen_config()), seed + 1)
  sd = {QV_VISION + k: v for k, v in siglip.state_dict().items()}   # incl. post_layernorm and head
  sd.update(qwen.state_dict())
  sd.update(compressor_tensors(seed=seed))
  return sd, siglip, qwen


def qv_config_json():
  cfg = qwen_config().to_dict()
  cfg.update(model_type="quicksviewer_qwen", architectures=["LlavaQwenForCausalLM"],
             mm_vision_tower="siglip-tiny", num_queries=Q, num_heads=TINY.compressor.num_heads,
             vision_config=siglip_config().to_dict())
  return cfg


def save_sharded(sd, directory, config_json=None, shards=2):
  """HF-style sharded safetensors with an index, split by name order."""
  directory.mkdir(parents=True, exist_ok=True)
  names = sorted(sd)
  weight_map = {}
  for i in range(shards):
    file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: sd[n].contiguous() for n in names[i::shards]}
    save_file(part, str(directory / file))
    weight_map.update({n: file for n in part})
  (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  if config_json is not None:
    (directory / "config.json").write_text(json.dumps(config_json))
  return directory


@pytest.fixture(scope="module")
def qv_checkpoint(tmp_path_factory):
  sd, siglip, qwen = quicksviewer_state_dict()
  src = save_sharded(sd, tmp_path_factory.mktemp("qv_src"), qv_config_json())
  return sd, siglip, qwen, src


@pytest.fixture(scope="module")
def qv_converted(qv_checkpoint, tmp_path_factory):
  sd, _, _, src = qv_checkpoint
  out = tmp_path_factory.mktemp("qv_out")
  reports = convert(src, out, size="tiny", progress=False, overwrite=True, flush_bytes=1 << 10)
  return reports, out


def test_layout_detection():
  assert detect_layout(["model.cubing.proj_fn.3.bias", "model.layers.0.mlp.up_proj.weight"]) == "quicksviewer"
  assert detect_layout(["vision_model.encoder.layers.0.mlp.fc1.weight"]) == "siglip"
  assert detect_layout(["embeddings.patch_embedding.weight"]) == "siglip"
  assert detect_layout(["model.embed_tokens.weight", "lm_head.weight"]) == "decoder"
  assert detect_layout(["weird"], {"model_type": "quicksviewer_qwen"}) == "quicksviewer"
  with pytest.raises(MappingError, match="--layout"):
    detect_layout(["weird"], {"model_type": "bert"})


def test_quicksviewer_layout_round_trips_names_and_shapes(qv_checkpoint, qv_converted):
  sd, _, _, _ = qv_checkpoint
  (report,), out = qv_converted
  assert report.layout == "quicksviewer"
  mapped = dict(report.mapped)
  ignored = set(report.ignored)
  assert ignored == {n for n in sd if n.startswith((QV_VISION + "post_layernorm.", QV_VISION + "head."))}
  assert set(mapped) | ignored == set(sd)
  stored = converted_params(out)
  targets = {t for ts in mapped.values() for t in ts}
  assert targets == set(stored)
  assert {p.split("/")[0] for p in stored} == {"vision_tower", "compressor", "decoder"}
  # No element is lost or invented: the mapped source tensors hold exactly the params' elements.
  assert sum(sd[n].numel() for n in mapped) == sum(int(np.prod(s)) for s, _ in stored.values())

  _, params = load_converted(out)
  vt, dec = params["vision_tower"], params["decoder"]
  np.testing.assert_array_equal(vt["layers"]["mlp"]["fc2"]["kernel"][1],
                                sd[QV_VISION + "encoder.layers.1.mlp.fc2.weight"].numpy().T)
  np.testing.assert_array_equal(vt["patch_embed"]["kernel"],
                                sd[QV_VISION + "embeddings.patch_embedding.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(dec["embed_tokens"]["embedding"], sd["model.embed_tokens.weight"].numpy())
  np.testing.assert_array_equal(dec["lm_head"]["kernel"], sd["lm_head.weight"].numpy().T)
  # Every compressor source value lands somewhere, unchanged up to layout (transpose / thirds).
  comp = {p: v for p, v in _flat(params["compressor"]).items()}
  for name in (n for n in sd if n.startswith(("model.cubing.", "model.vision_resampler."))):
    src = sd[name].numpy()
    pieces = np.split(src, 3) if "in_proj" in name else [src]
    for piece, target in zip(pieces, mapped[name]):
      value = comp[target.removeprefix("compressor/")]
      assert any(np.array_equal(value, cand) for cand in (piece, piece.T)), (name, target)
  proj = comp[[t for t in mapped["model.vision_resampler.proj"]][0].removeprefix("compressor/")]
  np.testing.assert_array_equal(proj, sd["model.vision_resampler.proj"].numpy())   # x @ proj: no transpose


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def test_quicksviewer_checkpoint_loads_into_the_whole_model(qv_converted):
  from qv_jax.model.quicksviewer import Quicksviewer
  _, out = qv_converted
  config, _ = load_converted(out)
  model = nnx.eval_shape(lambda: Quicksviewer(config.model, max_seq_len=config.data.max_seq_len, rngs=nnx.Rngs(0)))
  _, params = load_converted(out, nnx.state(model, nnx.Param), strict=True)
  assert len(nnx.to_flat_state(params)) == len(converted_params(out))
  assert params["decoder"]["embed_tokens"]["embedding"].dtype == jnp.float32


def test_quicksviewer_parts_compute_like_torch(qv_checkpoint, qv_converted):
  """The vision tower and the LLM converted from the Quicksviewer layout match transformers."""
  from qv_jax.model.decoder import Decoder
  _, siglip, qwen, _ = qv_checkpoint
  _, out = qv_converted
  config, _ = load_converted(out)
  tower = SiglipVisionTower(config.model.vision, rngs=nnx.Rngs(0))
  nnx.update(tower, load_converted(out, nnx.state(tower), part="vision_tower", strict=True)[1])
  pixels = np.random.RandomState(0).uniform(-1, 1, (2, 3, V.image_size, V.image_size)).astype(np.float32)
  with torch.no_grad():
    last = siglip(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-1].numpy()
  ours = np.asarray(tower.hidden_states(jnp.asarray(pixels.transpose(0, 2, 3, 1))))
  assert np.abs(ours - last).max() <= 1e-4

  decoder = Decoder(config.model.decoder, rngs=nnx.Rngs(0))
  nnx.update(decoder, load_converted(out, nnx.state(decoder), part="decoder", strict=True)[1])
  ids = np.random.RandomState(1).randint(0, D.vocab_size, (1, 9))
  with torch.no_grad():
    expected = qwen(input_ids=torch.from_numpy(ids)).logits.numpy()
  logits, _ = decoder(input_ids=jnp.asarray(ids), positions=jnp.arange(9)[None], mask=jnp.ones((1, 9), bool))
  assert np.abs(np.asarray(logits) - expected).max() <= 1e-4


def test_config_is_derived_from_the_quicksviewer_config_json(qv_checkpoint, tmp_path):
  *_, src = qv_checkpoint
  convert(src, tmp_path, progress=False)
  config, _ = load_converted(tmp_path)
  m = config.model
  assert (m.vision.hidden_size, m.vision.num_layers, m.vision.grid_out) == (V.hidden_size, V.num_layers, 6)
  assert (m.decoder.hidden_size, m.decoder.vocab_size, m.decoder.num_kv_heads) == (
      D.hidden_size, D.vocab_size, D.num_kv_heads)
  assert (m.compressor.embed_dim, m.compressor.num_queries, m.compressor.vision_dim) == (
      D.hidden_size, Q, V.hidden_size)
  stored = converted_params(tmp_path)
  assert stored["compressor/resampler/query"] == ((Q, D.hidden_size), "float32")
  assert stored["vision_tower/layers/mlp/fc1/kernel"] == ((V.num_layers, V.hidden_size, V.intermediate_size),
                                                          "float32")


def _expect_error(sd, tmp_path, *patterns, **kw):
  src = save_sharded(sd, tmp_path / "src", qv_config_json())
  out = tmp_path / "out"
  with pytest.raises(MappingError) as info:
    convert(src, out, size="tiny", progress=False, **kw)
  for p in patterns:
    assert p in str(info.value), str(info.value)
  assert not (out / "params").exists() and not (out / "config.json").exists()
  assert not list(out.glob("params*"))
  return str(info.value)


def test_missing_tensor_is_listed_with_its_shape(qv_checkpoint, tmp_path):
  sd = dict(qv_checkpoint[0])
  del sd["model.cubing.proj_fn.3.bias"]
  _expect_error(sd, tmp_path, "target params no source tensor provides", "compressor/", "[2]")


def test_missing_layer_is_listed(qv_checkpoint, tmp_path):
  sd = dict(qv_checkpoint[0])
  del sd["model.layers.1.mlp.up_proj.weight"]
  _expect_error(sd, tmp_path, "target params no source provides", "decoder/layers/mlp/up_proj/kernel[1]",
                "model.layers.0.mlp.up_proj.weight")


def test_extra_tensor_is_listed_with_its_shape(qv_checkpoint, tmp_path):
  sd = dict(qv_checkpoint[0])
  sd["model.cubing.extra_fn.weight"] = torch.zeros(3, 5)
  sd["model.mm_projector.0.weight"] = torch.zeros(2, 2)
  _expect_error(sd, tmp_path, "source tensors no rule maps", "model.cubing.extra_fn.weight: [3, 5]",
                "model.mm_projector.0.weight: [2, 2]")


def test_misshaped_tensors_are_all_listed_with_names_and_shapes(qv_checkpoint, tmp_path):
  sd = dict(qv_checkpoint[0])
  sd["model.vision_resampler.kv_proj.weight"] = torch.zeros(D.hidden_size, V.hidden_size + 1)
  sd[QV_VISION + "embeddings.position_embedding.weight"] = torch.zeros(50, V.hidden_size)
  msg = _expect_error(sd, tmp_path, "mis-shaped",
                      f"model.vision_resampler.kv_proj.weight: [{D.hidden_size}, {V.hidden_size + 1}]",
                      "vision_tower/position_embedding: got (50, 32), expected (49, 32)")
  assert "compressor/" in msg


def test_resize_vocab_for_a_plain_llm(tmp_path):
  qwen = randomize(transformers.Qwen2ForCausalLM(qwen_config(vocab=D.vocab_size + 40)), 3)
  src = tmp_path / "qwen"
  qwen.save_pretrained(src, safe_serialization=True)
  with pytest.raises(MappingError, match="--resize-vocab"):
    convert(src, tmp_path / "bad", size="tiny", progress=False)
  (report,) = convert(src, tmp_path / "out", size="tiny", progress=False, resize_vocab=True)
  assert report.layout == "decoder"
  _, params = load_converted(tmp_path / "out", part="decoder")
  emb = params["embed_tokens"]["embedding"]
  src_emb = qwen.model.embed_tokens.weight.detach().numpy()
  keep = D.vocab_size - 8
  assert emb.shape == (D.vocab_size, D.hidden_size)
  np.testing.assert_array_equal(emb[:keep], src_emb[:keep])
  np.testing.assert_allclose(emb[keep:], np.broadcast_to(src_emb[:keep].mean(0), (8, D.hidden_size)), atol=1e-6)
  head = params["lm_head"]["kernel"]
  np.testing.assert_allclose(head[:, keep:].T, np.broadcast_to(
      qwen.lm_head.weight.detach().numpy()[:keep].mean(0), (8, D.hidden_size)), atol=1e-6)


def test_resize_vocab_rows_keeps_smaller_tables_and_pads():
  table = np.arange(12, dtype=np.float32).reshape(6, 2)
  out = resize_vocab_rows(table, 9, num_new=2)      # 6 rows < 9 - 2: all kept, 3 mean rows
  np.testing.assert_array_equal(out[:6], table)
  np.testing.assert_array_equal(out[6:], np.tile(table.mean(0), (3, 1)))


def test_siglip_plus_llm_into_one_checkpoint_with_bf16_storage(tmp_path):
  siglip = randomize(transformers.SiglipVisionModel(siglip_config()), 5)
  qwen = randomize(transformers.Qwen2ForCausalLM(qwen_config()), 6)
  siglip.save_pretrained(tmp_path / "siglip", safe_serialization=True)
  qwen.save_pretrained(tmp_path / "qwen", safe_serialization=True)
  out = tmp_path / "out"
  reports = convert([tmp_path / "siglip", tmp_path / "qwen"], out, progress=False, dtype="bfloat16")
  assert [r.layout for r in reports] == ["siglip", "decoder"]
  stored = converted_params(out)
  assert {p.split("/")[0] for p in stored} == {"vision_tower", "decoder"}
  assert {d for _, d in stored.values()} == {"bfloat16"}
  config, raw = load_converted(out)
  assert raw["vision_tower"]["position_embedding"].dtype == ml_dtypes.bfloat16
  assert config.model.vision.hidden_size == V.hidden_size and config.model.decoder.vocab_size == D.vocab_size

  from qv_jax.model.quicksviewer import Quicksviewer
  state = nnx.state(nnx.eval_shape(lambda: Quicksviewer(config.model, max_seq_len=config.data.max_seq_len, rngs=nnx.Rngs(0))), nnx.Param)
  _, params = load_converted(out, state)                 # the compressor stays as initialised
  w = params["vision_tower"]["layers"]["mlp"]["fc1"]["kernel"]
  assert w.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(w[0]), siglip.state_dict()["encoder.layers.0.mlp.fc1.weight"]
                                .to(torch.bfloat16).float().numpy().T)
  with pytest.raises(MappingError, match="target params the checkpoint does not hold:\n  compressor/"):
    load_converted(out, state, strict=True)


def test_two_sources_with_the_same_part_are_refused(tmp_path):
  qwen = randomize(transformers.Qwen2ForCausalLM(qwen_config()), 6)
  qwen.save_pretrained(tmp_path / "qwen", safe_serialization=True)
  with pytest.raises(MappingError, match="two sources hold the decoder"):
    convert([tmp_path / "qwen", tmp_path / "qwen"], tmp_path / "out", progress=False)


def test_cli_entry_point_and_overwrite(tmp_path, capsys):
  siglip = randomize(transformers.SiglipVisionModel(siglip_config()), 7)
  siglip.save_pretrained(tmp_path / "siglip", safe_serialization=True)
  out = tmp_path / "out"
  args = ["--source", str(tmp_path / "siglip"), "--output", str(out)]
  assert main(args + ["--quiet"]) == 0
  assert "siglip: mapped 35 source tensors to 19 params, ignored 13" in capsys.readouterr().out
  assert main(args + ["--quiet"]) == 2
  assert "--overwrite" in capsys.readouterr().err
  proc = subprocess.run([sys.executable, "-m", "qv_jax.convert.cli", *args, "--overwrite"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "vision_tower/layers/self_attn/q_proj/kernel" in proc.stdout
  assert "[2, 32, 32]" in proc.stdout
  config, params = load_converted(out)
  assert config.model.vision.hidden_size == V.hidden_size
  assert params["vision_tower"]["layers"]["layer_norm1"]["scale"].shape == (2, V.hidden_size)
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "conversion.json", "params"]
  # params/ is a plain orbax pytree directory: the trainer's StandardCheckpointer restores it too.
  import jax
  import orbax.checkpoint as ocp
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  restored = ocp.StandardCheckpointer().restore(out / "params", abstract)
  np.testing.assert_array_equal(np.asarray(restored["vision_tower"]["position_embedding"]),
                                params["vision_tower"]["position_embedding"])


def test_llama3_checkpoint_config_round_trips_rope_scaling(tmp_path):
  rope = dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=256)
  llama = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=1, rope_parameters=rope, bos_token_id=None, eos_token_id=None,
      pad_token_id=None)), 8)
  llama.save_pretrained(tmp_path / "llama", safe_serialization=True)
  (report,) = convert(tmp_path / "llama", tmp_path / "out", progress=False)
  assert report.layout == "decoder"
  config, params = load_converted(tmp_path / "out", part="decoder")
  d = config.model.decoder
  assert (d.family, d.num_kv_heads, d.qkv_bias, d.vocab_size) == ("llama3", 1, False, 96)
  assert d.rope_scaling.factor == 8.0 and d.rope_scaling.original_max_position_embeddings == 256
  assert config.model.compressor.embed_dim == 64
  assert params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (2, 64, 1, 16)
