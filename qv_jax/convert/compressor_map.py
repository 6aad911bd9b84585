"""Name mapping from the reference compressor (cubing + vision_resampler) to the compressor's params.

The table is keyed to `Compressor` (the `cubing` kind); every registry kind keeps that tree under
`compressor/`, and params a kind adds (`score_gating`'s `policy/...`) have no reference source: they are
`kind_only_shapes`, written from the kind's initialisation (`parts.initialised_params`) and reported as
"initialised, not in the checkpoint".

Sources are the reference state-dict names without the leading `model.` (SPEC §8); targets are paths
relative to the Compressor module (`compressor/...` in the whole model, via `with_prefix`). Linear
weights (out, in) are transposed to kernels (in, out); MultiheadAttention's packed in_proj is split in
thirds (q, k, v) and each third transposed; `proj` is right-multiplied in the reference and kept as is;
LayerNorm weight/bias become scale/bias. The 3D sincos table is recomputed, never loaded.

Tables only: `parts.convert_compressor` applies the table in memory (dims read off the tensors by
`derive_config.compressor_config_from_tensors` when no config is given).
"""

from __future__ import annotations

from qv_jax.convert.mapping import compose, rule, split_thirds, transpose

_LN = r"(?P<ln>ln_q|ln_kv|ln_post)"

COMPRESSOR_TABLE = (
    rule(r"cubing\.agg_frame_fn\.0\.weight", "cubing/agg/kernel", transform=transpose),
    rule(r"cubing\.agg_frame_fn\.0\.bias", "cubing/agg/bias"),
    rule(r"cubing\.proj_fn\.0\.weight", "cubing/norm/scale"),
    rule(r"cubing\.proj_fn\.0\.bias", "cubing/norm/bias"),
    rule(r"cubing\.proj_fn\.1\.weight", "cubing/fc1/kernel", transform=transpose),
    rule(r"cubing\.proj_fn\.1\.bias", "cubing/fc1/bias"),
    rule(r"cubing\.proj_fn\.3\.weight", "cubing/fc2/kernel", transform=transpose),
    rule(r"cubing\.proj_fn\.3\.bias", "cubing/fc2/bias"),
    rule(r"cubing\.thumbnail_fn\.1\.weight", "thumbnail/kernel", transform=transpose),
    rule(r"cubing\.thumbnail_fn\.1\.bias", "thumbnail/bias"),
    rule(r"vision_resampler\.query", "resampler/query"),
    rule(r"vision_resampler\.kv_proj\.weight", "resampler/kv_proj/kernel", transform=transpose),
    rule(r"vision_resampler\.attn\.in_proj_weight", "resampler/q_proj/kernel", "resampler/k_proj/kernel",
         "resampler/v_proj/kernel", transform=compose(split_thirds, transpose)),
    rule(r"vision_resampler\.attn\.in_proj_bias", "resampler/q_proj/bias", "resampler/k_proj/bias",
         "resampler/v_proj/bias", transform=split_thirds),
    rule(r"vision_resampler\.attn\.out_proj\.weight", "resampler/out_proj/kernel", transform=transpose),
    rule(r"vision_resampler\.attn\.out_proj\.bias", "resampler/out_proj/bias"),
    rule(rf"vision_resampler\.{_LN}\.weight", "resampler/{ln}/scale"),
    rule(rf"vision_resampler\.{_LN}\.bias", "resampler/{ln}/bias"),
    rule(r"vision_resampler\.proj", "resampler/proj"),
)

# Buffers that may appear in a state dict but are recomputed (the non-persistent sincos table).
COMPRESSOR_IGNORE = (r"vision_resampler\.pos_embed",)


def compressor_param_shapes(model_config, kind: str | None = None) -> dict[str, tuple[int, ...]]:
  """{path: shape} of every param of the compressor of `kind` (default: `model_config.compressor.kind`)
  (abstract; nothing is allocated)."""
  from flax import nnx

  from qv_jax.convert.mapping import state_paths
  from qv_jax.model.compressors.registry import compressor_class, compressor_kind
  cls = compressor_class(kind or compressor_kind(model_config.compressor))
  return state_paths(nnx.state(nnx.eval_shape(lambda: cls(model_config.compressor, rngs=nnx.Rngs(0)))))


def reference_shapes(model_config) -> dict[str, tuple[int, ...]]:
  """The compressor params a reference checkpoint provides: those of `Compressor` (the table's keys)."""
  return compressor_param_shapes(model_config, "cubing")


def kind_only_shapes(model_config) -> dict[str, tuple[int, ...]]:
  """{path: shape} of the params the configured kind adds to `Compressor` (no reference source)."""
  ref = reference_shapes(model_config)
  return {p: s for p, s in compressor_param_shapes(model_config).items() if p not in ref}
