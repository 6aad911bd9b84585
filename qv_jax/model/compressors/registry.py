"""The compressor registry: `model.compressor.kind` -> the module class (imported lazily).

Adding a compressor = a new module + one line in KINDS. Every kind keeps its params under `compressor/`
in the whole model; kinds built on `Compressor` keep its param tree, so reference checkpoints convert
into them unchanged (extra params, e.g. the gating policy, stay at their initial values).
"""

from __future__ import annotations

import importlib

from qv_jax.config.errors import require

KINDS = {
    "cubing": "qv_jax.model.compressor:Compressor",
    "uniform": "qv_jax.model.compressors.uniform:UniformCubes",
    "score_gating": "qv_jax.model.compressors.score_gating:ScoreGating",
    "question_select": "qv_jax.model.compressors.question_select:QuestionSelect",
}
SELECT_TOKENS = ("pooled", "cubes")


def compressor_kind(c) -> str:
  """`model.compressor.kind` ("cubing" for configs written before the registry: the typed default)."""
  return str(c.kind)


def validate_kind(c) -> None:
  f = "model.compressor"
  kind = compressor_kind(c)
  require(kind in KINDS, f"{f}.kind", f"{kind!r}; expected one of {tuple(KINDS)}")
  if kind == "score_gating":
    require(0.0 < float(c.keep_ratio) <= 1.0, f"{f}.keep_ratio", f"{c.keep_ratio} not in (0, 1]")
    require(int(c.policy_hidden) > 0, f"{f}.policy_hidden", f"must be positive, got {c.policy_hidden}")
  if kind == "question_select":
    for name in ("select_frames", "segment_frames", "question_len"):
      require(int(getattr(c, name)) > 0, f"{f}.{name}", f"must be positive, got {getattr(c, name)}")
    require(c.select_tokens in SELECT_TOKENS, f"{f}.select_tokens",
            f"{c.select_tokens!r}; expected one of {SELECT_TOKENS}")


def compressor_class(kind: str):
  require(kind in KINDS, "model.compressor.kind", f"{kind!r}; expected one of {tuple(KINDS)}")
  module, name = KINDS[kind].split(":")
  return getattr(importlib.import_module(module), name)


def build_compressor(config, *, rngs):
  """The compressor module of `config.kind` (a `CompressorConfig`)."""
  return compressor_class(compressor_kind(config))(config, rngs=rngs)


def visual_token_bound(c, num_frames: int) -> int:
  """The most visual tokens one video of the bucket F puts in the prompt at inference (η = 0);
  c: a `CompressorConfig`."""
  from qv_jax.model.gumbel import max_cubes
  kind = compressor_kind(c)
  cubes = (int(c.grid_size) ** 2) // int(c.thumbnail_pool) + max_cubes(num_frames, int(c.frames_per_cube)) \
      * int(c.num_queries)
  if kind == "score_gating":
    from qv_jax.model.compressors.score_gating import budget_tokens
    return budget_tokens(num_frames, int(c.num_queries), float(c.keep_ratio))
  if kind == "question_select" and c.select_tokens == "pooled":
    return min(int(c.select_frames), num_frames)
  return cubes
