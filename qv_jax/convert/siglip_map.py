"""HF SigLIP vision weights -> `SiglipVisionTower` params (see its docstring for the target tree).

Source names are those of a `SiglipVisionModel` / `SiglipModel` state dict, with or without the
`vision_model.` prefix (transformers 5 saves `SiglipVisionModel` without it; older versions and the
Quicksviewer checkpoint, under `model.vision_tower.vision_tower.`, keep it). Linear weights (out, in) are
transposed; the conv weight (O, I, kh, kw) becomes (kh, kw, I, O). The post-LayerNorm, the pooling head
and, for a full `SiglipModel`, the text tower are ignored on purpose.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np

from qv_jax.convert.mapping import (MappingError, apply_table, conv_to_hwio, rule, state_paths,
                                    transpose)

_V = r"(?:vision_model\.)?"
_LAYER = _V + r"encoder\.layers\.(?P<layer>\d+)\."

SIGLIP_TABLE = (
    rule(_V + r"embeddings\.patch_embedding\.weight", "patch_embed/kernel", transform=conv_to_hwio),
    rule(_V + r"embeddings\.patch_embedding\.bias", "patch_embed/bias"),
    rule(_V + r"embeddings\.position_embedding\.weight", "position_embedding"),
    rule(_LAYER + r"layer_norm(?P<n>[12])\.weight", "layers/layer_norm{n}/scale", stack="layer"),
    rule(_LAYER + r"layer_norm(?P<n>[12])\.bias", "layers/layer_norm{n}/bias", stack="layer"),
    rule(_LAYER + r"self_attn\.(?P<p>q|k|v|out)_proj\.weight", "layers/self_attn/{p}_proj/kernel",
         transform=transpose, stack="layer"),
    rule(_LAYER + r"self_attn\.(?P<p>q|k|v|out)_proj\.bias", "layers/self_attn/{p}_proj/bias",
         stack="layer"),
    rule(_LAYER + r"mlp\.(?P<fc>fc[12])\.weight", "layers/mlp/{fc}/kernel", transform=transpose,
         stack="layer"),
    rule(_LAYER + r"mlp\.(?P<fc>fc[12])\.bias", "layers/mlp/{fc}/bias", stack="layer"),
)

# Dropped on purpose: unused by the reference (SPEC §2) or not part of the vision tower.
SIGLIP_IGNORE = (
    _V + r"post_layernorm\..*",
    _V + r"head\..*",
    _V + r"embeddings\.position_ids",
    r"text_model\..*",
    r"logit_(?:scale|bias)",
)

SIGLIP_MODEL_TYPES = ("siglip_vision_model", "siglip")


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


def expected_vision_shapes(model_config) -> dict[str, tuple[int, ...]]:
  """{param path: shape} of `SiglipVisionTower(model_config.vision)` (a `ModelConfig`), without allocating
  it."""
  from flax import nnx

  from qv_jax.model.vision_tower import SiglipVisionTower
  abstract = nnx.eval_shape(lambda: SiglipVisionTower(model_config.vision, rngs=nnx.Rngs(0)))
  return state_paths(nnx.state(abstract))


def convert_siglip(names: Iterable[str], load: Callable[[str], np.ndarray], model_config,
                   sink: Callable[[str, np.ndarray], None] | None = None) -> dict[str, np.ndarray]:
  """Maps HF SigLIP tensors to tower params ({path: array}); a mismatch raises `MappingError`.
  For a whole checkpoint on disk prefer `qv_jax.convert.cli.convert`, which streams to orbax."""
  out, _ = apply_table(SIGLIP_TABLE, names, load, expected_vision_shapes(model_config),
                       ignore=SIGLIP_IGNORE, sink=sink)
  return out
