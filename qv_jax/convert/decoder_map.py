"""HF Qwen2 / Qwen2.5 and Llama 3.x checkpoints -> `qv_jax.model.decoder.Decoder` params.

Source names are the HF (and Quicksviewer) state-dict keys: `model.embed_tokens.weight`,
`model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}`, `model.layers.{i}.mlp.{gate,up,down}_proj.weight`,
`model.layers.{i}.{input,post_attention}_layernorm.weight`, `model.norm.weight`, `lm_head.weight`.
Targets are paths relative to the Decoder (see its module docstring); inside the whole model use
`with_prefix(decoder_table(cfg), "decoder/")` with `decoder_ignore(cfg)` and `expected_decoder_shapes`.

Layouts: Linear (out, in) -> kernel (in, out), with the q/k/v head axis split out ([D, heads, head_dim])
and o_proj as [heads, head_dim, D]; layers are stacked on axis 0 (`stack="layer"`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np

from qv_jax.config.errors import ConfigError
from qv_jax.config.model import decoder_defaults
from qv_jax.config.typed import DecoderConfig, ModelConfig
from qv_jax.convert.mapping import Rule, apply_table, rule, state_paths, transpose

_LAYER = r"model\.layers\.(?P<layer>\d+)\."


# A tensor whose size does not fit is passed on unreshaped, so the table's shape check reports it by name.

def _heads_in(num_heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
  """q/k/v weight (heads·hd, D) -> kernel (D, heads, hd)."""
  def fn(x):
    x = np.ascontiguousarray(x.T)
    return x.reshape(x.shape[0], num_heads, head_dim) if x.shape[-1] == num_heads * head_dim else x
  return fn


def _heads_bias(num_heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
  """q/k/v bias (heads·hd,) -> (heads, hd)."""
  def fn(x):
    return x.reshape(num_heads, head_dim) if x.shape == (num_heads * head_dim,) else x
  return fn


def _heads_out(num_heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
  """o_proj weight (D, heads·hd) -> kernel (heads, hd, D)."""
  def fn(x):
    x = np.ascontiguousarray(x.T)
    return x.reshape(num_heads, head_dim, x.shape[-1]) if x.shape[0] == num_heads * head_dim else x
  return fn


def _decoder_section(config) -> DecoderConfig:
  return config.decoder if isinstance(config, ModelConfig) else config


def decoder_table(decoder_config) -> list[Rule]:
  """Rules from HF names to Decoder param paths for `model.decoder` (a model config is accepted too)."""
  d = _decoder_section(decoder_config)
  h, kv, hd = d.num_heads, d.num_kv_heads, d.head_dim
  attn = "layers/self_attn/"
  table = [
      rule(r"model\.embed_tokens\.weight", "embed_tokens/embedding"),
      rule(_LAYER + r"self_attn\.q_proj\.weight", attn + "q_proj/kernel", transform=_heads_in(h, hd),
           stack="layer"),
      rule(_LAYER + r"self_attn\.k_proj\.weight", attn + "k_proj/kernel", transform=_heads_in(kv, hd),
           stack="layer"),
      rule(_LAYER + r"self_attn\.v_proj\.weight", attn + "v_proj/kernel", transform=_heads_in(kv, hd),
           stack="layer"),
      rule(_LAYER + r"self_attn\.o_proj\.weight", attn + "o_proj/kernel", transform=_heads_out(h, hd),
           stack="layer"),
      rule(_LAYER + r"mlp\.gate_proj\.weight", "layers/mlp/gate_proj/kernel", transform=transpose,
           stack="layer"),
      rule(_LAYER + r"mlp\.up_proj\.weight", "layers/mlp/up_proj/kernel", transform=transpose, stack="layer"),
      rule(_LAYER + r"mlp\.down_proj\.weight", "layers/mlp/down_proj/kernel", transform=transpose,
           stack="layer"),
      rule(_LAYER + r"input_layernorm\.weight", "layers/input_layernorm/scale", stack="layer"),
      rule(_LAYER + r"post_attention_layernorm\.weight", "layers/post_attention_layernorm/scale",
           stack="layer"),
      rule(r"model\.norm\.weight", "norm/scale"),
  ]
  if d.qkv_bias:
    table += [
        rule(_LAYER + r"self_attn\.q_proj\.bias", attn + "q_proj/bias", transform=_heads_bias(h, hd),
             stack="layer"),
        rule(_LAYER + r"self_attn\.k_proj\.bias", attn + "k_proj/bias", transform=_heads_bias(kv, hd),
             stack="layer"),
        rule(_LAYER + r"self_attn\.v_proj\.bias", attn + "v_proj/bias", transform=_heads_bias(kv, hd),
             stack="layer"),
    ]
  if not d.tie_embeddings:
    table.append(rule(r"lm_head\.weight", "lm_head/kernel", transform=transpose))
  return table


def decoder_ignore(decoder_config) -> list[str]:
  """Source-name regexes dropped on purpose: rotary buffers of old checkpoints, and `lm_head.weight`
  when the embeddings are tied (some tied checkpoints still save the duplicate)."""
  d = _decoder_section(decoder_config)
  out = [_LAYER + r"self_attn\.rotary_emb\.inv_freq"]
  if d.tie_embeddings:
    out.append(r"lm_head\.weight")
  return out


def expected_decoder_shapes(model_config) -> dict[str, tuple[int, ...]]:
  """{param path: shape} of the Decoder for a `ModelConfig` (or a bare `DecoderConfig`), built abstractly."""
  from flax import nnx
  from qv_jax.model.decoder import Decoder
  abstract = nnx.eval_shape(lambda: Decoder(_decoder_section(model_config), rngs=nnx.Rngs(0)))
  return state_paths(nnx.state(abstract))


def convert_decoder(tensors: Mapping[str, np.ndarray] | tuple[Iterable[str], Callable[[str], np.ndarray]],
                    model_config, *, sink: Callable[[str, np.ndarray], None] | None = None
                    ) -> dict[str, np.ndarray]:
  """HF tensors -> {Decoder param path: array}, checked against the model's shapes.

  tensors: {name: array} or (names, load) to stream a large checkpoint one tensor at a time. Raises
  `MappingError` listing every missing, extra or mis-shaped tensor.
  """
  names, load = ((list(tensors), tensors.__getitem__) if isinstance(tensors, Mapping) else tensors)
  out, _ = apply_table(decoder_table(model_config), names, load, expected=expected_decoder_shapes(model_config),
                       ignore=decoder_ignore(model_config), sink=sink)
  return out


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
