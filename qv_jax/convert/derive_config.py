"""The qv-jax config a checkpoint implies: from its config.json (HF SigLIP, Qwen2 / Qwen2.5, Llama 3.x, or
the released Quicksviewer's) and tensor shapes, or, for bare compressor tensors, from their shapes.

`derive_config` composes the parts for `qv_jax.convert.cli`; `decoder_config_from_hf`,
`vision_config_from_hf` and `compressor_config_from_tensors` give one part each.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import numpy as np

from qv_jax.config import get_config, validate
from qv_jax.config.errors import ConfigError
from qv_jax.config.model import decoder_defaults, validate_compressor
from qv_jax.config.typed import Config, DecoderConfig
from qv_jax.convert.layouts import converted_parts
from qv_jax.convert.mapping import MappingError
from qv_jax.convert.quicksviewer_map import QV_VISION_PREFIX, layout_parts


def _so400m_like(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> bool:
  patch = shapes.get(prefix + "vision_model.embeddings.patch_embedding.weight",
                     shapes.get(prefix + "embeddings.patch_embedding.weight"))
  return patch is not None and tuple(patch) == (1152, 3, 14, 14)


def derive_config(sources: Iterable[tuple[str, Mapping | None, Mapping[str, tuple[int, ...]]]],
                  size: str | None = None) -> Config:
  """The qv-jax config for one or more checkpoints, each given as (layout, config.json dict or None,
  {tensor name: shape}). With `size`: the preset of that size (the checkpoints must fit it). Without:
  each part comes from the checkpoint holding it (SigLIP / Qwen2 / Llama config.json fields; for a
  Quicksviewer checkpoint its LLM fields, `vision_config` or the so400m preset, and `num_queries`,
  `num_heads`), the rest from the matching released size. Validated for the parts the sources hold only
  (a decoder of width 72 converts although no compressor could be built on it)."""
  sources = list(sources)
  seen: dict[str, str] = {}
  for layout, _, _ in sources:
    for part in layout_parts(layout):
      if part in seen:
        raise MappingError(f"two sources hold the {part} ({seen[part]} and {layout} layouts)")
      seen[part] = layout
  parts = converted_parts(layout for layout, _, _ in sources)
  if size:
    return validate(get_config(f"size={size}"), parts)
  decoder, vision, qv_json = None, None, {}
  for layout, config_json, shapes in sources:
    cj = dict(config_json or {})
    if not cj:
      raise MappingError(f"the {layout} checkpoint has no config.json; pass --size to name its config")
    if layout in ("decoder", "quicksviewer"):
      decoder = decoder_config_from_hf(cj)
    if layout == "siglip":
      vision = vision_config_from_hf(cj)
    elif layout == "quicksviewer":
      qv_json = cj
      if cj.get("vision_config"):
        vision = vision_config_from_hf(cj["vision_config"])
      elif not _so400m_like(shapes, QV_VISION_PREFIX):
        raise MappingError("the Quicksviewer config.json has no vision_config and the tower is not "
                           "SigLIP so400m/14 (patch_embedding [1152, 3, 14, 14]); pass --size")
  config = get_config("size=" + ("llama3_8b" if decoder is not None and decoder.family == "llama3"
                                 else "qwen2_7b")).to_dict()
  m = config["model"]
  if decoder is not None:
    m["decoder"] = dict(decoder.to_dict(), remat_policy=m["decoder"]["remat_policy"],
                        scan_layers=m["decoder"]["scan_layers"])
  if vision is not None:
    m["vision"].update(vision)
  c, v, d = m["compressor"], m["vision"], m["decoder"]
  c.update(vision_dim=v["hidden_size"], grid_size=v["grid_out"], embed_dim=d["hidden_size"])
  width = d["hidden_size"]
  c["num_heads"] = int(qv_json.get("num_heads") or (width // 128 if width >= 1024 else 4))
  c["num_queries"] = int(qv_json.get("num_queries") or
                         (64 if width >= 1024 else v["grid_out"] ** 2 // c["thumbnail_pool"]))
  config["data"]["image_size"] = v["image_size"]
  return validate(config, parts)


def vision_config_from_hf(config_json: Mapping, grid_out: int | None = None) -> dict:
  """`model.vision` fields from an HF SigLIP config.json (a `SiglipVisionConfig`, or a `SiglipConfig`
  whose `vision_config` holds it). grid_out defaults to 24 for a 27×27 patch grid (so400m at 384 px,
  SPEC §2), otherwise to the largest multiple of 3 not above the native grid, so that the thumbnail's
  9-token pool divides the frame's tokens (7×7 -> 6×6)."""
  cfg = dict(config_json.get("vision_config") or config_json)
  act = cfg.get("hidden_act", "gelu_pytorch_tanh")
  if act not in ("gelu_pytorch_tanh", "gelu_new"):
    raise MappingError(f"SigLIP config: hidden_act {act!r} is not supported; expected 'gelu_pytorch_tanh'")
  if int(cfg.get("num_channels", 3)) != 3:
    raise MappingError(f"SigLIP config: num_channels {cfg.get('num_channels')}; expected 3 (RGB)")
  try:
    fields = dict(hidden_size=int(cfg["hidden_size"]), intermediate_size=int(cfg["intermediate_size"]),
                  num_layers=int(cfg["num_hidden_layers"]), num_heads=int(cfg["num_attention_heads"]),
                  patch_size=int(cfg["patch_size"]), image_size=int(cfg["image_size"]),
                  layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-6)))
  except KeyError as e:
    raise MappingError(f"SigLIP config.json lacks the field {e.args[0]!r}") from None
  native = fields["image_size"] // fields["patch_size"]
  fields["grid_out"] = int(grid_out) if grid_out else (24 if native == 27 else max(native - native % 3, 1))
  return fields


def _family(cfg: Mapping[str, Any]) -> str:
  model_type = str(cfg.get("model_type", "")).lower()
  archs = " ".join(cfg.get("architectures") or []).lower()
  if "qwen" in model_type or "qwen" in archs:
    return "qwen2"
  if "llama" in model_type or "llama" in archs:
    return "llama3"
  raise ConfigError("config.json model_type", f"{cfg.get('model_type')!r}; expected a Qwen2 or Llama model")


def _rope(cfg: Mapping[str, Any]) -> tuple[float, dict | None]:
  """(θ, llama3 scaling or None) from the old (`rope_theta` + `rope_scaling`) or the transformers≥5
  (`rope_parameters`) layout."""
  params = dict(cfg.get("rope_parameters") or {})
  scaling = dict(cfg.get("rope_scaling") or {}) or params
  theta = cfg.get("rope_theta") or params.get("rope_theta")
  if theta is None:
    raise ConfigError("config.json rope_theta", "missing (neither rope_theta nor rope_parameters.rope_theta)")
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind in ("default", None):
    return float(theta), None
  if kind != "llama3":
    raise ConfigError("config.json rope_scaling", f"rope type {kind!r} is not supported; expected llama3")
  return float(theta), dict(type="llama3", factor=float(scaling["factor"]),
                            low_freq_factor=float(scaling["low_freq_factor"]),
                            high_freq_factor=float(scaling["high_freq_factor"]),
                            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def decoder_config_from_hf(config_json: Mapping[str, Any]) -> DecoderConfig:
  """`model.decoder` from an HF (or Quicksviewer) config.json dict: family, sizes, RoPE θ / llama3 scaling,
  RMSNorm eps, tied embeddings, q/k/v bias; run-time fields (remat, scan, attention) get their defaults.
  The dtypes are float32 until it joins a `ModelConfig`."""
  cfg = dict(config_json)
  family = _family(cfg)
  if cfg.get("hidden_act", "silu") != "silu":
    raise ConfigError("config.json hidden_act", f"{cfg['hidden_act']!r}; expected 'silu'")
  if cfg.get("use_sliding_window"):
    raise ConfigError("config.json use_sliding_window", "sliding-window attention is not supported")
  if family == "llama3" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
    raise ConfigError("config.json attention_bias", "Llama attention/MLP biases are not supported")
  try:
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    theta, scaling = _rope(cfg)
    out = decoder_defaults("tiny").to_dict()
    out.update(
        family=family, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads), rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=family == "qwen2")
  except KeyError as e:
    raise ConfigError(f"config.json {e.args[0]}", "missing") from None
  if hidden >= 1024:
    out["attention_impl"] = "chunked"
  return DecoderConfig.from_config_dict(out)


def compressor_config_from_tensors(names: Mapping[str, str], tensors: Mapping[str, np.ndarray]):
  """A validated `ModelConfig` whose compressor dims (Dv, D, Q) are read from the kv_proj and query
  tensors."""
  missing = [n for n in ("vision_resampler.kv_proj.weight", "vision_resampler.query") if n not in names]
  if missing:
    raise MappingError(f"cannot infer the compressor dims: missing {missing}; pass model_config")
  d, dv = np.shape(tensors[names["vision_resampler.kv_proj.weight"]])
  q = np.shape(tensors[names["vision_resampler.query"]])[0]
  model = validate(get_config("size=tiny")).model
  model = dataclasses.replace(
      model, vision=dataclasses.replace(model.vision, hidden_size=int(dv)),
      compressor=dataclasses.replace(model.compressor, vision_dim=int(dv), embed_dim=int(d), num_queries=int(q),
                                     num_heads=1))
  validate_compressor(model.compressor, model.vision)
  return model
