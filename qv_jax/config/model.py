"""Model sections of the config: `model.vision` (SigLIP), `model.compressor` (cubing + resampler +
thumbnail) and `model.decoder` (Qwen2 / Llama 3), with the released sizes and small test sizes."""

import ml_collections

from qv_jax.config.errors import require

DTYPES = ("float32", "bfloat16", "float16")

_VISION = {
    # SigLIP so400m/14@384: 27×27 patches, interpolated to 24×24 (SPEC §2).
    "so400m": dict(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
                   patch_size=14, image_size=384, grid_out=24),
    # 98 px / 14 = 7×7 patches, interpolated to 6×6 = 36 tokens per frame (36 / 9 = 4 thumbnail tokens).
    "tiny": dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                 patch_size=14, image_size=98, grid_out=6),
    "small": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  patch_size=14, image_size=98, grid_out=6),
}

_DECODER = {
    "qwen2_7b": dict(family="qwen2", vocab_size=151673, hidden_size=3584, intermediate_size=18944,
                     num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6,
                     rope_scaling=None, rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=True),
    "llama3_8b": dict(family="llama3", vocab_size=128265, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=5e5,
                      rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192),
                      rms_norm_eps=1e-5, tie_embeddings=False, qkv_bias=False),
    "tiny": dict(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4, rope_scaling=None,
                 rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=True),
    "small": dict(family="qwen2", vocab_size=1024, hidden_size=128, intermediate_size=256,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=1e4,
                  rope_scaling=None, rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=True),
}


def vision_defaults(size: str) -> ml_collections.ConfigDict:
  base = _VISION["so400m" if size in ("qwen2_7b", "llama3_8b") else size]
  return ml_collections.ConfigDict(dict(
      base,
      layer_norm_eps=1e-6,
      frame_chunk=16,          # frames per sample per step of `encode_frames` (lax.map over chunks)
      remat_policy="nothing_saveable",  # REMAT_POLICIES: each frame chunk and each encoder layer in the
                                        # backward pass ("none": no remat; an old `remat` bool translates)
      gather_once=False,       # FSDP: all-gather the tower's weights once per step, not per frame chunk
                               # (docs/planner.md; costs the full tower's fp32 weights and gradients per chip)
  ))


def compressor_defaults(size: str) -> ml_collections.ConfigDict:
  vision = vision_defaults(size)
  decoder = _DECODER[size]
  d = decoder["hidden_size"]
  return ml_collections.ConfigDict(dict(
      vision_dim=vision.hidden_size,
      embed_dim=d,
      num_heads=d // 128 if d >= 1024 else 4,   # reference: D // 128 (28 for Qwen2.5-7B, 32 for Llama-3.1-8B)
      num_queries=64 if d >= 1024 else (vision.grid_out ** 2) // 9,
      grid_size=vision.grid_out,               # tokens per frame = grid_size²
      momentum_alpha=0.8,                      # hard-coded in the reference (SPEC §11.1)
      gumbel_tau=0.5,
      frames_per_cube=5,                       # FPQ: k = max(round(N / FPQ) - 1, 1)
      partition="gumbel",                      # "gumbel" (learned) or "uniform" (a cube every FPQ frames)
      resampler_impl="fast",                   # "fast" (DESIGN.md) or "plain" (per-token K/V)
      thumbnail_pool=9,                        # consecutive raster tokens averaged per thumbnail token
      token_chunk=4608,                        # tokens per online-softmax chunk in the fast resampler
      save_scores=True,                        # fast resampler keeps fp32 scores [B,F·P,H·Q] for the
                                               # backward (-25% FLOPs) instead of recomputing them
      mlp_layer_norm_eps=1e-5,                 # proj_fn LayerNorm (PyTorch default)
      resampler_layer_norm_eps=1e-6,
      pos_temperature=10000.0,
      kind="cubing",                           # the compressor (qv_jax/model/compressors/registry.py)
      keep_ratio=0.1,                          # score_gating: share of the F·Q per-frame tokens kept
      policy_hidden=256,                       # score_gating: width of the gating policy's hidden layer
      select_frames=8,                         # question_select: frames kept (M, capped at F)
      segment_frames=8,                        # question_select: frames per local-attention segment
      select_layers=(),                        # question_select: decoder layers scored (() = middle one)
      select_tokens="pooled",                  # question_select: "pooled" (1 token/frame) or "cubes"
      question_len=32,                         # question_select: question tokens read (the last ones)
  ))


# Decoder-only sizes for benchmarks and experiments (not model sizes: no vision/compressor section).
# Qwen2.5-0.5B: ~494 M parameters, tied embeddings.
DECODER_EXTRA_SIZES = {
    "qwen2_0_5b": dict(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6,
                       rope_scaling=None, rms_norm_eps=1e-6, tie_embeddings=True, qkv_bias=True),
}

ATTENTION_IMPLS = ("plain", "chunked")
CONTEXT_ATTENTION = ("auto", "allgather", "ring")


def decoder_defaults(size: str) -> ml_collections.ConfigDict:
  """`model.decoder` for a model size or a `DECODER_EXTRA_SIZES` name.

  attention_impl: "plain" holds the [B, heads, L, S] scores whole; "chunked" processes `attention_chunk`
  queries at a time (exact, rematerialised per chunk), for long training sequences.
  context_attention: attention of a sequence split over a `context` mesh axis C > 1 (no KV cache):
  "allgather" gathers K/V once per layer; "ring" passes K/V blocks around a zig-zag ring (the length a
  multiple of 2C); "auto" is the ring where the length allows, else the all-gather (docs/context.md).
  """
  cfg = dict(_DECODER[size] if size in _DECODER else DECODER_EXTRA_SIZES[size])
  small = cfg["hidden_size"] < 1024
  cfg.update(remat_policy="nothing_saveable", scan_layers=True,
             attention_impl="plain" if small else "chunked", attention_chunk=512,
             context_attention="auto")
  return ml_collections.ConfigDict(cfg)


def model_defaults(size: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      size=size,
      compute_dtype="float32" if size in ("tiny", "small") else "bfloat16",
      param_dtype="float32",
      vision=vision_defaults(size),
      compressor=compressor_defaults(size),
      decoder=decoder_defaults(size),
  ))


def validate_vision(v) -> None:
  f = "model.vision"
  for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size",
               "image_size", "grid_out", "frame_chunk"):
    require(int(getattr(v, name)) > 0, f"{f}.{name}", f"must be positive, got {getattr(v, name)}")
  require(v.hidden_size % v.num_heads == 0, f"{f}.num_heads",
          f"{v.num_heads} heads do not divide hidden_size {v.hidden_size}")
  native = v.image_size // v.patch_size   # VALID conv: 384 // 14 = 27
  require(v.grid_out <= native, f"{f}.grid_out",
          f"{v.grid_out} exceeds the native patch grid {native}×{native}")
  require(v.layer_norm_eps > 0, f"{f}.layer_norm_eps", f"must be positive, got {v.layer_norm_eps}")
  require(v.remat_policy in REMAT_POLICIES, f"{f}.remat_policy",
          f"{v.remat_policy!r}; expected one of {REMAT_POLICIES}")


def validate_compressor(c, vision=None) -> None:
  """Checks `model.compressor`; with `vision`, also that it matches the tower's width and grid."""
  f = "model.compressor"
  require(c.embed_dim > 0 and c.embed_dim % 8 == 0, f"{f}.embed_dim",
          f"D={c.embed_dim} must be a positive multiple of 8 (3D sincos split 2/8 | 3/8 | 3/8)")
  require(c.embed_dim % 16 == 0, f"{f}.embed_dim",
          f"D={c.embed_dim}: the sincos parts D/8·2, D/8·3, D/8·3 must be even, so D must be a multiple "
          f"of 16")
  require(c.num_heads > 0 and c.embed_dim % c.num_heads == 0, f"{f}.num_heads",
          f"{c.num_heads} heads do not divide embed_dim D={c.embed_dim}")
  if vision is not None:
    require(c.vision_dim == vision.hidden_size, f"{f}.vision_dim",
            f"{c.vision_dim} != model.vision.hidden_size {vision.hidden_size}")
    require(c.grid_size == vision.grid_out, f"{f}.grid_size",
            f"{c.grid_size} != model.vision.grid_out {vision.grid_out}")
  require((c.grid_size ** 2) % c.thumbnail_pool == 0, f"{f}.thumbnail_pool",
          f"{c.thumbnail_pool} does not divide the {c.grid_size ** 2} tokens of a frame")
  require(c.num_queries > 0, f"{f}.num_queries", f"must be positive, got {c.num_queries}")
  require(0.0 <= c.momentum_alpha <= 1.0, f"{f}.momentum_alpha", f"{c.momentum_alpha} not in [0, 1]")
  require(c.gumbel_tau > 0, f"{f}.gumbel_tau", f"must be positive, got {c.gumbel_tau}")
  require(c.frames_per_cube >= 1, f"{f}.frames_per_cube", f"must be >= 1, got {c.frames_per_cube}")
  require(c.partition in ("gumbel", "uniform"), f"{f}.partition",
          f"{c.partition!r}; expected 'gumbel' or 'uniform'")
  require(c.resampler_impl in ("fast", "plain"), f"{f}.resampler_impl",
          f"{c.resampler_impl!r}; expected 'fast' or 'plain'")
  require(c.token_chunk > 0, f"{f}.token_chunk", f"must be positive, got {c.token_chunk}")
  require(isinstance(c.save_scores, bool), f"{f}.save_scores", f"must be True or False, got {c.save_scores!r}")
  require(c.vision_dim > 0 and c.grid_size > 0, f"{f}.vision_dim",
          f"vision_dim {c.vision_dim} and grid_size {c.grid_size} must be positive")
  for name in ("mlp_layer_norm_eps", "resampler_layer_norm_eps", "pos_temperature"):
    require(getattr(c, name) > 0, f"{f}.{name}", f"must be positive, got {getattr(c, name)}")
  from qv_jax.model.compressors.registry import validate_kind
  validate_kind(c)


def validate_decoder(d, compressor=None) -> None:
  """Checks `model.decoder`; with `compressor`, also that the resampler width matches."""
  f = "model.decoder"
  require(d.family in ("qwen2", "llama3"), f"{f}.family", f"{d.family!r}; expected 'qwen2' or 'llama3'")
  for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "attention_chunk"):
    require(int(getattr(d, name)) > 0, f"{f}.{name}", f"must be positive, got {getattr(d, name)}")
  if compressor is not None:
    require(d.hidden_size == compressor.embed_dim, f"{f}.hidden_size",
            f"{d.hidden_size} != model.compressor.embed_dim {compressor.embed_dim}")
  require(d.num_heads % d.num_kv_heads == 0, f"{f}.num_kv_heads",
          f"{d.num_kv_heads} KV heads do not divide {d.num_heads} heads")
  require(d.head_dim % 2 == 0, f"{f}.head_dim", f"RoPE needs an even head_dim, got {d.head_dim}")
  require(d.rope_theta > 0, f"{f}.rope_theta", f"must be positive, got {d.rope_theta}")
  require(d.rms_norm_eps > 0, f"{f}.rms_norm_eps", f"must be positive, got {d.rms_norm_eps}")
  if d.rope_scaling is not None:
    s = d.rope_scaling
    require(getattr(s, "type", None) == "llama3", f"{f}.rope_scaling.type",
            f"{getattr(s, 'type', None)!r}; only 'llama3' scaling is supported")
    for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
      require(getattr(s, name, None) is not None and float(getattr(s, name)) > 0, f"{f}.rope_scaling.{name}",
              f"must be present and positive, got {getattr(s, name, None)!r}")
    require(s.high_freq_factor > s.low_freq_factor, f"{f}.rope_scaling.high_freq_factor",
            f"{s.high_freq_factor} must exceed low_freq_factor {s.low_freq_factor}")
  require(d.remat_policy in REMAT_POLICIES, f"{f}.remat_policy",
          f"{d.remat_policy!r}; expected one of {REMAT_POLICIES}")
  require(d.attention_impl in ATTENTION_IMPLS, f"{f}.attention_impl",
          f"{d.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
  mode = d.context_attention
  require(mode in CONTEXT_ATTENTION, f"{f}.context_attention", f"{mode!r}; expected one of {CONTEXT_ATTENTION}")


# "none", or the name of a `jax.checkpoint_policies` policy the decoder's layers are rematerialised with
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


MODEL_PARTS = ("vision_tower", "compressor", "decoder")


def validate_model(m, parts=MODEL_PARTS) -> None:
  """Checks the sections of `parts` (a converted decoder alone is not held to the compressor's rules)."""
  require(m.compute_dtype in DTYPES, "model.compute_dtype", f"{m.compute_dtype!r}; expected one of {DTYPES}")
  require(m.param_dtype in DTYPES, "model.param_dtype", f"{m.param_dtype!r}; expected one of {DTYPES}")
  if "vision_tower" in parts:
    validate_vision(m.vision)
  if "compressor" in parts:
    validate_compressor(m.compressor, m.vision)
  if "decoder" in parts:
    validate_decoder(m.decoder, m.compressor if "compressor" in parts else None)
