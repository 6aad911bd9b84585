"""Training stages (SPEC §7): which parameter groups train, and the split of the model's parameters into a
trainable and a frozen pure dict (the frozen part gets no gradient and no optimizer state).

Groups are named by full-model param paths (`Quicksviewer`: `vision_tower/...`, `compressor/...`,
`decoder/...`): `compressor`, `embed_tokens` (decoder/embed_tokens), `lm_head` (decoder/lm_head, or the
embeddings when they are tied), `vision_tower`, `decoder` (the whole LLM), `policy` (compressor/policy: the score_gating policy alone).
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx

from qv_jax.config.errors import require
from qv_jax.config.train import PARAM_GROUPS, STAGE_TRAINABLE

_GROUP_PREFIXES = {
    "compressor": (("compressor",),),
    "policy": (("compressor", "policy"),),
    "embed_tokens": (("decoder", "embed_tokens"),),
    "lm_head": (("decoder", "lm_head"),),
    "vision_tower": (("vision_tower",),),
    "decoder": (("decoder",),),
}


def trainable_groups(config) -> tuple[str, ...]:
  """The groups that train in `config.train.stage` (or `train.trainable_override`)."""
  t = config.train
  require(t.stage in STAGE_TRAINABLE, "train.stage", f"unknown stage {t.stage!r}; expected 1, 2 or 3")
  groups = tuple(t.trainable_override) or STAGE_TRAINABLE[t.stage]
  if t.reference_frozen_vision_tower:
    groups = tuple(g for g in groups if g != "vision_tower")
  if "lm_head" in groups and config.model.decoder.tie_embeddings:
    groups = groups + ("embed_tokens",)
  return tuple(g for g in PARAM_GROUPS if g in groups)


def _key(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def path_in_groups(path: tuple, groups: tuple[str, ...]) -> bool:
  names = tuple(_key(k) for k in path)
  return any(names[:len(prefix)] == prefix for g in groups for prefix in _GROUP_PREFIXES[g])


def trainable_filter(groups: tuple[str, ...]) -> Callable[[tuple, Any], bool]:
  """An nnx filter: Params under one of `groups`."""
  return lambda path, value: isinstance(value, nnx.Param) and path_in_groups(path, groups)


def split_model(model: nnx.Module, groups: tuple[str, ...]):
  """-> (graphdef, trainable, frozen): pure nested dicts; `nnx.merge(graphdef, trainable, frozen)`
  rebuilds the model. `frozen` holds every other variable too."""
  graphdef, trainable, frozen = nnx.split(model, trainable_filter(groups), ...)
  return graphdef, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
