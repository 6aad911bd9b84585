"""HF Qwen2 / Qwen2.5 and Llama 3.x checkpoints -> `qv_jax.model.decoder.Decoder` params.

Source names are the HF (and Quicksviewer) state-dict keys: `model.embed_tokens.weight`,
`model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}`, `model.layers.{i}.mlp.{gate,up,down}_proj.weight`,
`model.layers.{i}.{input,post_attention}_layernorm.weight`, `model.norm.weight`, `lm_head.weight`.
Targets are paths relative to the Decoder (see its module docstring); inside the whole model use
`with_prefix(decoder_table(cfg), "decoder/")` with `decoder_ignore(cfg)` and `expected_decoder_shapes`.

Layouts: Linear (out, in) -> kernel (in, out), with the q/k/v head axis split out ([D, heads, head_dim])
and o_proj as [heads, head_dim, D]; layers are stacked on axis 0 (`stack="layer"`).

Tables only: the `model.decoder` an HF config.json implies is `derive_config.decoder_config_from_hf`;
`parts.convert_decoder` applies the table in memory.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from qv_jax.config.typed import DecoderConfig, ModelConfig
from qv_jax.convert.mapping import Rule, rule, state_paths, transpose

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
