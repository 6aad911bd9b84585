"""HF SigLIP vision weights -> `SiglipVisionTower` params (see its docstring for the target tree).

Source names are those of a `SiglipVisionModel` / `SiglipModel` state dict, with or without the
`vision_model.` prefix (transformers 5 saves `SiglipVisionModel` without it; older versions and the
Quicksviewer checkpoint, under `model.vision_tower.vision_tower.`, keep it). Linear weights (out, in) are
transposed; the conv weight (O, I, kh, kw) becomes (kh, kw, I, O). The post-LayerNorm, the pooling head
and, for a full `SiglipModel`, the text tower are ignored on purpose.

Tables only: the `model.vision` fields a SigLIP config.json implies are `derive_config.vision_config_from_hf`;
`parts.convert_siglip` applies the table in memory.
"""

from __future__ import annotations

from qv_jax.convert.mapping import conv_to_hwio, rule, state_paths, transpose

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


def expected_vision_shapes(model_config) -> dict[str, tuple[int, ...]]:
  """{param path: shape} of `SiglipVisionTower(model_config.vision)` (a `ModelConfig`), without allocating
  it."""
  from flax import nnx

  from qv_jax.model.vision_tower import SiglipVisionTower
  abstract = nnx.eval_shape(lambda: SiglipVisionTower(model_config.vision, rngs=nnx.Rngs(0)))
  return state_paths(nnx.state(abstract))
