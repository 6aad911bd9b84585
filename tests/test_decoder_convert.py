"""The HF -> Decoder name-mapping table, config import and their errors."""

import re

import numpy as np
import pytest

from configs.quicksviewer import get_config
from qv_jax.config import ConfigError, validate
from qv_jax.config.model import decoder_defaults
from qv_jax.convert.decoder_map import decoder_ignore, decoder_table, expected_decoder_shapes
from qv_jax.convert.derive_config import decoder_config_from_hf
from qv_jax.convert.mapping import MappingError, apply_table, with_prefix
from qv_jax.convert.parts import convert_decoder

# config.json of the released checkpoints (old transformers layout), abridged to the fields read.
QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
             "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
             "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
             "rope_scaling": None, "sliding_window": 131072, "tie_word_embeddings": False,
             "use_sliding_window": False, "vocab_size": 151673}
LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
              "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336, "mlp_bias": False,
              "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
              "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192,
                                                      "rope_type": "llama3"},
              "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128265}
ARCH_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
               "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_embeddings", "qkv_bias")


@pytest.mark.parametrize("config_json,size", [(QWEN25_7B, "qwen2_7b"), (LLAMA31_8B, "llama3_8b"),
                                              (dict(QWEN25_7B, model_type="quicksviewer_qwen"), "qwen2_7b")])
def test_config_from_hf_matches_the_released_sizes(config_json, size):
  got = decoder_config_from_hf(config_json)
  want = decoder_defaults(size)
  for field in ARCH_FIELDS:
    assert getattr(got, field) == want[field], field
  if want.rope_scaling is None:
    assert got.rope_scaling is None
  else:
    assert got.rope_scaling.to_dict() == want.rope_scaling.to_dict()
  assert got.attention_impl == "chunked" and got.remat_policy == want.remat_policy


def test_config_from_hf_reads_the_transformers5_layout():
  new = dict(LLAMA31_8B, rope_parameters=dict(LLAMA31_8B["rope_scaling"], rope_theta=250000.0),
             tie_word_embeddings=True, head_dim=96)
  del new["rope_scaling"], new["rope_theta"]
  got = decoder_config_from_hf(new)
  assert got.rope_theta == 250000.0 and got.rope_scaling.factor == 8.0 and got.head_dim == 96
  assert got.tie_embeddings
  default = decoder_config_from_hf(dict(QWEN25_7B, rope_parameters=dict(rope_type="default", rope_theta=7.0),
                                        rope_theta=None))
  assert default.rope_theta == 7.0 and default.rope_scaling is None


@pytest.mark.parametrize("change,field", [
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]), "model_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(vocab_size=None), "vocab_size"),
])
def test_config_from_hf_rejects_what_it_cannot_run(change, field):
  bad = {k: v for k, v in dict(QWEN25_7B, **change).items() if v is not None or k != "vocab_size"}
  with pytest.raises(ConfigError, match=field):
    decoder_config_from_hf(bad)


def _fake_checkpoint(cfg, rng=np.random.RandomState(0)):
  """Random tensors under the HF names of a decoder config, in PyTorch layouts."""
  d = cfg.decoder
  D, F, H, KV, hd = d.hidden_size, d.intermediate_size, d.num_heads, d.num_kv_heads, d.head_dim
  t = {"model.embed_tokens.weight": (d.vocab_size, D), "model.norm.weight": (D,)}
  for i in range(d.num_layers):
    p = f"model.layers.{i}."
    t.update({p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (KV * hd, D),
              p + "self_attn.v_proj.weight": (KV * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
              p + "self_attn.q_proj.bias": (H * hd,), p + "self_attn.k_proj.bias": (KV * hd,),
              p + "self_attn.v_proj.bias": (KV * hd,), p + "mlp.gate_proj.weight": (F, D),
              p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F),
              p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,)})
  if not d.tie_embeddings:
    t["lm_head.weight"] = (d.vocab_size, D)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in t.items()}


def test_conversion_layouts_and_streaming():
  cfg = validate(get_config("size=tiny")).model
  tensors = _fake_checkpoint(cfg)
  loads = []

  def load(name):
    loads.append(name)
    return tensors[name]

  out = convert_decoder((list(tensors), load), cfg)
  assert sorted(loads) == sorted(tensors)                  # every tensor read exactly once
  assert {k: v.shape for k, v in out.items()} == expected_decoder_shapes(cfg)
  q = tensors["model.layers.1.self_attn.q_proj.weight"]    # (H·hd, D): row h·hd + j is head h, dim j
  np.testing.assert_array_equal(out["layers/self_attn/q_proj/kernel"][1, 5, 3, 7], q[3 * 16 + 7, 5])
  o = tensors["model.layers.0.self_attn.o_proj.weight"]    # (D, H·hd)
  np.testing.assert_array_equal(out["layers/self_attn/o_proj/kernel"][0, 2, 9, 11], o[11, 2 * 16 + 9])
  np.testing.assert_array_equal(out["layers/self_attn/k_proj/bias"][1].reshape(-1),
                                tensors["model.layers.1.self_attn.k_proj.bias"])
  np.testing.assert_array_equal(out["layers/mlp/down_proj/kernel"][1],
                                tensors["model.layers.1.mlp.down_proj.weight"].T)
  np.testing.assert_array_equal(out["lm_head/kernel"], tensors["lm_head.weight"].T)


def test_tied_checkpoint_may_carry_a_duplicate_lm_head():
  c = get_config("size=tiny")
  c.model.decoder.tie_embeddings = True
  cfg = validate(c).model
  tensors = _fake_checkpoint(cfg)
  assert "lm_head/kernel" not in convert_decoder(tensors, cfg)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
  assert "lm_head/kernel" not in convert_decoder(tensors, cfg)


def test_mismatched_checkpoints_list_every_problem():
  cfg = validate(get_config("size=tiny")).model
  tensors = _fake_checkpoint(cfg)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  del tensors["model.norm.weight"]
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 64), np.float32)
  tensors["model.layers.0.self_attn.k_proj.bias"] = np.zeros((3 * 32,), np.float32)
  tensors["model.vision_tower.extra.weight"] = np.zeros((2,), np.float32)
  with pytest.raises(MappingError) as err:
    convert_decoder(tensors, cfg)
  message = str(err.value)
  for needle in ("model.vision_tower.extra.weight", "layers/mlp/up_proj/kernel: missing stacked entries [1]",
                 "norm/scale: (64,)", "layers/self_attn/k_proj/bias"):
    assert needle in message, needle
  assert re.search(r"cannot reshape|k_proj", message)


def test_table_composes_under_a_prefix():
  """The full-model converter uses the table as `decoder/...` beside other parts' tensors."""
  cfg = validate(get_config("size=tiny")).model
  tensors = _fake_checkpoint(cfg)
  tensors["model.cubing.proj.weight"] = np.zeros((2, 2), np.float32)
  table = with_prefix(decoder_table(cfg.decoder), "decoder/")
  expected = {"decoder/" + k: v for k, v in expected_decoder_shapes(cfg).items()}
  out, report = apply_table(table, list(tensors), tensors.__getitem__, expected=expected,
                            ignore=decoder_ignore(cfg) + [r"model\.cubing\..*"])
  assert set(out) == set(expected) and report.ignored == ["model.cubing.proj.weight"]
