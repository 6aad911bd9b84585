"""The `mesh` section and the one logical-axis rules table (DESIGN.md: sharding plan)."""

import ml_collections

from qv_jax.config.errors import require

MESH_AXES = ("data", "fsdp", "context", "tensor")

# Logical axis name -> mesh axis (or axes, or None). The only place logical names meet mesh axes.
# Params carry the weight names, activations (`constrain`, shard_map specs, the KV cache, the batch) the
# `activation_*` names, so the two can be sharded independently (docs/configs_and_sharding.md).
WEIGHT_AXIS_RULES = (
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("vision_mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("queries", None),
    ("tokens", None),
    ("layers", None),
    ("channels", None),
)

ACTIVATION_AXIS_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_context_batch", ("data", "fsdp", "context")),  # [B·C] rows: a sample's frame shards
    ("activation_frames", "context"),
    ("activation_length", "context"),
    ("activation_tokens", None),
    ("activation_cubes", None),
    ("activation_queries", None),
    ("activation_embed", "fsdp"),
    ("activation_vision_embed", "fsdp"),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_vocab", "tensor"),
    ("activation_layers", None),
)

LOGICAL_AXIS_RULES = WEIGHT_AXIS_RULES + ACTIVATION_AXIS_RULES


def mesh_defaults() -> ml_collections.ConfigDict:
  """Axis sizes; one axis may be -1 (all remaining devices). `context` splits one sample's frames and
  merged sequence (docs/context.md)."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1))


def validate_mesh(m) -> None:
  sizes = [getattr(m, a) for a in MESH_AXES]
  for a, s in zip(MESH_AXES, sizes):
    require(s == -1 or s >= 1, f"mesh.{a}", f"must be -1 or >= 1, got {s}")
  require(sizes.count(-1) <= 1, "mesh", f"at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
