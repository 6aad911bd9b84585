"""Typed configs: `validate` returns frozen per-part dataclasses, every module takes its own part (and
refuses a ConfigDict), and nothing outside qv_jax/config/ reads a ConfigDict."""

import dataclasses
import itertools
import json
import os
import re

import jax
import pytest
from flax import nnx

from qv_jax.config import (CompressorConfig, Config, ConfigError, DecoderConfig, ModelConfig, VisionConfig,
                           get_config, validate)
from qv_jax.model.compressors.registry import KINDS, build_compressor
from qv_jax.model.decoder import Decoder
from qv_jax.model.quicksviewer import Quicksviewer
from qv_jax.model.vision_tower import SiglipVisionTower

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("qv_jax", "data_pipeline", "launch", "benchmarks")
CONFIG_DICT = re.compile(r"\bml_collections\b|\bConfigDict\b")
# the absl CLI entry: config_flags parses --config and its overrides into a ConfigDict that goes to train()
CLI_ENTRY = {os.path.join("launch", "train.py"): "from ml_collections import config_flags"}


def _shapes(module) -> dict:
  return {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _tiny(kind: str = "cubing") -> Config:
  cd = get_config("size=tiny")
  cd.model.compressor.kind = kind
  return validate(cd)


def test_no_module_outside_config_reads_a_config_dict():
  bad = []
  for top in SCANNED:
    for root, _, files in os.walk(os.path.join(REPO, top)):
      rel_root = os.path.relpath(root, REPO)
      if rel_root.startswith(os.path.join("qv_jax", "config")):
        continue
      for f in (f for f in files if f.endswith(".py")):
        rel = os.path.join(rel_root, f)
        for i, line in enumerate(open(os.path.join(root, f)), 1):
          if CONFIG_DICT.search(line) and CLI_ENTRY.get(rel) != line.strip():
            bad.append(f"{rel}:{i}: {line.strip()}")
  assert not bad, "\n".join(bad)


def test_the_cli_entry_hands_its_config_dict_to_train_only():
  text = open(os.path.join(REPO, "launch", "train.py")).read()
  assert text.count("_CONFIG.value") == 1 and "train(config," in text


def test_each_part_builds_from_its_typed_config():
  c = _tiny()
  v, comp, d = c.model.vision, c.model.compressor, c.model.decoder
  tower = nnx.eval_shape(lambda: SiglipVisionTower(v, rngs=nnx.Rngs(0)))
  shapes = _shapes(tower)
  g = v.image_size // v.patch_size
  assert shapes["position_embedding"] == (g * g, v.hidden_size)
  assert shapes["layers/mlp/fc1/kernel"] == (v.num_layers, v.hidden_size, v.intermediate_size)
  decoder = nnx.eval_shape(lambda: Decoder(d, rngs=nnx.Rngs(0)))
  shapes = _shapes(decoder)
  assert shapes["embed_tokens/embedding"] == (d.vocab_size, d.hidden_size)
  assert shapes["layers/self_attn/k_proj/kernel"] == (d.num_layers, d.hidden_size, d.num_kv_heads, d.head_dim)
  assert shapes["lm_head/kernel"] == (d.hidden_size, d.vocab_size)
  model = nnx.eval_shape(lambda: Quicksviewer(c.model, max_seq_len=c.data.max_seq_len, rngs=nnx.Rngs(0)))
  assert model.max_seq_len == c.data.max_seq_len
  whole = _shapes(model)
  assert whole["compressor/resampler/query"] == (comp.num_queries, comp.embed_dim)
  assert whole["decoder/norm/scale"] == (d.hidden_size,)
  assert whole["vision_tower/layers/layer_norm1/scale"] == (v.num_layers, v.hidden_size)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_compressor_kind_builds_from_its_typed_config(kind):
  comp = _tiny(kind).model.compressor
  module = nnx.eval_shape(lambda: build_compressor(comp, rngs=nnx.Rngs(0)))
  shapes = _shapes(module)
  assert shapes["resampler/query"] == (comp.num_queries, comp.embed_dim)
  assert shapes["thumbnail/kernel"] == (comp.vision_dim, comp.embed_dim)
  assert shapes["cubing/fc2/kernel"] == (comp.vision_dim, 2)
  assert ("policy/fc1/kernel" in shapes) == (kind == "score_gating")
  if kind == "score_gating":
    assert shapes["policy/fc1/kernel"] == (2 * comp.embed_dim, comp.policy_hidden)
  if kind == "question_select":
    assert module.layers == (comp.decoder_layers // 2,)


def test_dtypes_reach_the_parts():
  cd = get_config("size=tiny")
  cd.model.compute_dtype = "bfloat16"
  c = validate(cd)
  for part in (c.model.vision, c.model.compressor, c.model.decoder):
    assert (part.dtype, part.param_dtype) == ("bfloat16", "float32")
  model = nnx.eval_shape(lambda: Quicksviewer(c.model, max_seq_len=64, rngs=nnx.Rngs(0)))
  assert model.decoder.dtype == model.vision_tower.dtype == model.compressor.dtype == jax.numpy.bfloat16
  m = dataclasses.replace(c.model, param_dtype="bfloat16")
  assert m.decoder.param_dtype == m.vision.param_dtype == m.compressor.param_dtype == "bfloat16"
  assert m.compressor.decoder_layers == c.model.decoder.num_layers


@pytest.mark.parametrize("build", [
    lambda cd: SiglipVisionTower(cd.model.vision, rngs=nnx.Rngs(0)),
    lambda cd: build_compressor(cd.model.compressor, rngs=nnx.Rngs(0)),
    lambda cd: Decoder(cd.model.decoder, rngs=nnx.Rngs(0)),
    lambda cd: Quicksviewer(cd.model, max_seq_len=64, rngs=nnx.Rngs(0)),
    lambda cd: Decoder(validate(cd).model, rngs=nnx.Rngs(0)),
], ids=["tower", "compressor", "decoder", "quicksviewer", "decoder_given_the_model"])
def test_a_part_refuses_anything_but_its_typed_config(build):
  with pytest.raises(TypeError, match=r"takes a qv_jax\.config\.typed\.\w+Config"):
    build(get_config("size=tiny"))


@pytest.mark.parametrize("size,stage", list(itertools.product(("tiny", "small", "qwen2_7b", "llama3_8b"),
                                                              (1, 2, 3))))
def test_round_trip_of_every_preset(size, stage):
  cd = get_config(f"size={size},stage={stage}")
  typed = Config.from_config_dict(cd)
  assert typed.to_dict() == cd.to_dict()
  assert typed.to_json(indent=2) == cd.to_json_best_effort(indent=2)     # config.json keeps its format
  assert validate(cd) == typed
  assert Config.from_config_dict(json.loads(typed.to_json())) == typed
  assert validate(typed) is typed


def test_frozen_and_hashable():
  c = _tiny()
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.model.decoder.num_layers = 3
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.data = None
  assert hash(c.model.compressor) == hash(_tiny().model.compressor)


@pytest.mark.parametrize("section,field", [("model.vision", "hidden_sise"), ("data", "batchsize"),
                                           ("train", "not_a_field"), ("model.decoder.rope_scaling", "x")])
def test_unknown_field_is_named(section, field):
  raw = get_config("size=llama3_8b").to_dict()
  node = raw
  for key in section.split("."):
    node = node[key]
  node[field] = 1
  with pytest.raises(ConfigError, match=re.escape(f"{section}.{field}")):
    validate(raw)


def test_missing_field_is_named():
  raw = get_config("size=tiny").to_dict()
  del raw["model"]["decoder"]["head_dim"]
  with pytest.raises(ConfigError, match=r"model\.decoder\.head_dim.*missing"):
    validate(raw)
  del raw["train"]
  with pytest.raises(ConfigError, match="train"):
    validate(raw)


@pytest.mark.parametrize("remat,policy", [(True, "nothing_saveable"), (False, "none")])
def test_old_vision_remat_translates(remat, policy):
  raw = get_config("size=tiny").to_dict()
  del raw["model"]["vision"]["remat_policy"]
  raw["model"]["vision"]["remat"] = remat
  c = validate(raw)
  assert c.model.vision.remat_policy == policy
  assert "remat" not in c.to_dict()["model"]["vision"]
  cd = get_config("size=tiny")
  cd.model.vision.remat = remat        # a set-up that assigns the old field on the ConfigDict
  assert validate(cd).model.vision.remat_policy == policy


def test_bad_vision_remat_values_are_named():
  raw = get_config("size=tiny").to_dict()
  raw["model"]["vision"].pop("remat_policy")
  raw["model"]["vision"]["remat"] = "yes"
  with pytest.raises(ConfigError, match=r"model\.vision\.remat\b"):
    validate(raw)
  cd = get_config("size=tiny")
  cd.model.vision.remat_policy = "sometimes"
  with pytest.raises(ConfigError, match=r"model\.vision\.remat_policy"):
    validate(cd)


def test_configs_before_late_fields_still_validate():
  """A config.json written before fields such as `compressor.kind` or `data.pack_samples` existed."""
  raw = get_config("size=tiny").to_dict()
  for section, name in (("data", "pack_samples"), ("data", "seq_buckets"), ("train", "score_rollouts"),
                        ("train", "allow_config_change")):
    del raw[section][name]
  del raw["model"]["compressor"]["kind"]
  del raw["model"]["decoder"]["context_attention"]
  c = validate(raw)
  assert (c.model.compressor.kind, c.data.pack_samples, c.model.decoder.context_attention) == ("cubing", 1, "auto")


def test_model_config_parts_are_the_typed_classes():
  m = _tiny().model
  assert isinstance(m, ModelConfig) and isinstance(m.vision, VisionConfig)
  assert isinstance(m.compressor, CompressorConfig) and isinstance(m.decoder, DecoderConfig)
  assert m.decoder.rope_scaling is None
  rope = validate(get_config("size=llama3_8b")).model.decoder.rope_scaling
  assert rope.factor == 8.0 and rope.to_dict()["original_max_position_embeddings"] == 8192
