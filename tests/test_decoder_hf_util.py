"""Shared helpers for the decoder / generation tests: random tiny HF checkpoints (torch CPU) saved as
safetensors, converted with the same code users run, and jitted decoder calls."""

from __future__ import annotations

import json
import os
from functools import partial

import jax
import jax.numpy as jnp
import dataclasses
import types
import numpy as np
import safetensors.numpy
import torch
import transformers
from flax import nnx

from qv_jax.convert.derive_config import decoder_config_from_hf
from qv_jax.convert.mapping import load_into
from qv_jax.convert.parts import convert_decoder
from qv_jax.model.decoder import Decoder

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=256)


def hf_config(family: str, *, kv_heads: int = 2, tie: bool = False, scaling: bool = False, vocab: int = 97,
              hidden: int = 64, heads: int = 4, layers: int = 2, theta: float = 1e4):
  common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                tie_word_embeddings=tie, max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
                pad_token_id=None)
  if family == "qwen2":
    return transformers.Qwen2Config(rope_theta=theta, **common)
  rope = dict(LLAMA3_SCALING, rope_theta=theta) if scaling else dict(rope_type="default", rope_theta=theta)
  return transformers.LlamaConfig(rope_parameters=rope, **common)


def hf_model(config, seed: int = 0):
  """A causal LM with every parameter random (norm weights around 1, biases non-zero), in eval mode."""
  torch.manual_seed(seed)
  cls = transformers.Qwen2ForCausalLM if config.model_type == "qwen2" else transformers.LlamaForCausalLM
  model = cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model


def save_and_convert(model, tmp_dir, compute_dtype: str = "float32", **decoder_overrides):
  """save_pretrained(safetensors) -> config + tensors read back with safetensors.numpy -> converted
  Decoder. Returns (decoder, model_config)."""
  path = os.path.join(str(tmp_dir), "hf")
  model.save_pretrained(path, safe_serialization=True)
  with open(os.path.join(path, "config.json")) as f:
    config_json = json.load(f)
  tensors = {}
  for name in sorted(os.listdir(path)):
    if name.endswith(".safetensors"):
      tensors.update(safetensors.numpy.load_file(os.path.join(path, name)))
  decoder_cfg = dataclasses.replace(decoder_config_from_hf(config_json), dtype=compute_dtype,
                                    **decoder_overrides)
  model_config = types.SimpleNamespace(decoder=decoder_cfg)
  arrays = convert_decoder(tensors, decoder_cfg)
  decoder = Decoder(decoder_cfg, rngs=nnx.Rngs(1))
  load_into(decoder, arrays)
  return decoder, model_config


def torch_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
  with torch.no_grad():
    kw = {} if attention_mask is None else dict(attention_mask=torch.tensor(attention_mask, dtype=torch.long))
    return model(input_ids=torch.tensor(ids, dtype=torch.long), **kw).logits.float().numpy()


@partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, positions, mask):
  return nnx.merge(graphdef, state)(input_ids=ids, positions=positions, mask=mask)[0]


def forward(decoder, ids, positions=None, mask=None):
  """Jitted logits [B, L, V] of a no-cache call (positions default 0..L-1, mask all True)."""
  ids = jnp.asarray(ids, jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
  mask = jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask)
  graphdef, state = nnx.split(decoder)
  return np.asarray(_forward(graphdef, state, ids, jnp.asarray(positions, jnp.int32), mask))
