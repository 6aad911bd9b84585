"""Tiny Hugging Face Qwen2-layout checkpoints for tests and benchmarks: the tensor names and shapes, and
the config.json that describes them (`tests/test_convert_hostile.py`, `benchmarks/convert_misshaped.py`)."""

from __future__ import annotations

import json
from pathlib import Path


def qwen2_layout(vocab: int = 512, hidden: int = 64, heads: int = 4, kv: int = 2, inter: int = 128,
                 layers: int = 2, lm_head_rows: int | None = None) -> tuple[dict[str, tuple[int, ...]], dict]:
  """({tensor name: shape}, config.json dict) of an untied Qwen2 decoder; `lm_head_rows` mis-shapes lm_head."""
  hd = hidden // heads
  shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
            "lm_head.weight": (lm_head_rows or vocab, hidden)}
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes.update({p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.q_proj.bias": (heads * hd,),
                   p + "self_attn.k_proj.weight": (kv * hd, hidden), p + "self_attn.k_proj.bias": (kv * hd,),
                   p + "self_attn.v_proj.weight": (kv * hd, hidden), p + "self_attn.v_proj.bias": (kv * hd,),
                   p + "self_attn.o_proj.weight": (hidden, heads * hd),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter),
                   p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
  config = dict(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, rope_theta=1e4,
                rms_norm_eps=1e-6, tie_word_embeddings=False)
  return shapes, config


def write_config_json(directory: str | Path, config: dict) -> None:
  (Path(directory) / "config.json").write_text(json.dumps(config))
