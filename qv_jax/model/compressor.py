"""The video compressor: cubing network + 3D resampler + thumbnail (SPEC §3-§4), as one NNX module.

`Compressor(config.model.compressor, rngs=)(features [B, F, P, Dv], num_frames [B], key=, noise_weight=)` returns a
`CompressorOutput` with static shapes for the bucket F: Kmax = max_cubes(F) cube slots, of which the
first k_b + 1 are real. Param tree (paths under `compressor/` in the whole model):

  cubing/agg/{kernel [Dv,Dv], bias}      cubing/norm/{scale, bias}     (reference cubing.agg_frame_fn.0,
  cubing/fc1/{kernel [Dv,Dv], bias}      cubing/fc2/{kernel [Dv,2], bias [2]}       proj_fn.0/1/3)
  thumbnail/{kernel [Dv, D], bias [D]}                                         (cubing.thumbnail_fn.1)
  resampler/query [Q, D]                   resampler/kv_proj/kernel [Dv, D]    (vision_resampler.*)
  resampler/{ln_q, ln_kv, ln_post}/{scale, bias} [D]
  resampler/{q_proj, k_proj, v_proj, out_proj}/{kernel [D, D], bias [D]}    resampler/proj [D, D]

Partition: "gumbel" places the k_b inner boundaries by Gumbel top-k of the logits (noise weight η;
η = 0 is deterministic), "uniform" starts cube j at frame floor(j·N_b / (k_b+1)) and ignores the logits
(they still feed the auxiliary term). Gradients reach the cubing network only through the thumbnail
weights ẑ (straight-through) and the auxiliary term; the partition itself is not differentiable.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qv_jax.config.model import validate_compressor
from qv_jax.config.typed import CompressorConfig, expect
from qv_jax.layers import Dense
from qv_jax.model import gumbel
from qv_jax.model.cubing import Cubing, aux_norm_loss, cube_partition, pool_tokens, thumbnail_features
from qv_jax.model.gumbel import gumbel_noise_weight, max_cubes, num_cubes
from qv_jax.model.resampler import Resampler
from qv_jax.parallel.context_cubing import global_frame_means
from qv_jax.sharding import FRAME_AXES, constrain

__all__ = ["Compressor", "CompressorOutput", "check_inputs", "num_cubes",
           "max_cubes", "gumbel_noise_weight"]


@flax.struct.dataclass
class CompressorOutput:
  thumbnail: jax.Array     # [B, P/9, D]
  cube_tokens: jax.Array   # [B, Kmax, Q, D] (zero in unused slots)
  cube_mask: jax.Array     # [B, Kmax] bool, True for the k_b + 1 real cubes
  cube_start: jax.Array    # [B, Kmax] int32 first frame of each cube (0 for unused cubes)
  cube_ids: jax.Array      # [B, F] int32 cube of each frame (padded frames: the last cube's id)
  boundary: jax.Array      # [B, F] fp32 straight-through ẑ: exactly 1.0 where a cube starts, else 0.0
  logits: jax.Array        # [B, F-1, 2] fp32 cubing logits z
  logit_mask: jax.Array    # [B, F-1] bool, valid rows of z (t < N_b - 1)
  aux_loss: jax.Array      # scalar: mean over valid rows of ‖z‖₂ (0 if none)
  token_mask: jax.Array | None = None  # [B, Kmax, Q] bool: kept tokens of each slot (None: all of them)
  diagnostics: dict | None = None      # kind-specific arrays (gate logits, frame scores, ...)


def check_inputs(features, num_frames, settings: CompressorConfig | None = None) -> None:
  """Host-side validation of concrete inputs before the jitted call; raises ValueError naming the
  field, the sample and the expected value. features [B, F, P, Dv]; num_frames [B] with 2 ≤ N_b ≤ F;
  the valid frames of every sample must be finite (padded frames are ignored)."""
  shape = tuple(np.shape(features))
  if len(shape) != 4:
    raise ValueError(f"features: expected [B, F, P, Dv], got shape {shape}")
  b, f, p, dv = shape
  if settings is not None:
    _check_static(shape, settings)
  n = np.asarray(num_frames)
  if n.shape != (b,):
    raise ValueError(f"num_frames: expected shape ({b},) for a batch of {b}, got {n.shape}")
  if not np.issubdtype(n.dtype, np.integer):
    raise ValueError(f"num_frames: expected integers, got dtype {n.dtype}")
  for i, count in enumerate(n.tolist()):
    if count < 2:
      raise ValueError(f"num_frames[{i}] = {count}: a video needs at least 2 frames for cubing")
    if count > f:
      raise ValueError(f"num_frames[{i}] = {count}: more frames than the bucket F = {f}")
  host = np.asarray(features)
  for i, count in enumerate(n.tolist()):
    bad = ~np.isfinite(host[i, :count])
    if bad.any():
      frame = int(np.argwhere(bad)[0][0])
      raise ValueError(f"features[{i}]: {int(bad.sum())} non-finite values in the {count} valid frames "
                       f"(first at frame {frame})")


def _check_static(shape, s: CompressorConfig) -> None:
  if len(shape) != 4:
    raise ValueError(f"features: expected [B, F, P, Dv], got shape {shape}")
  _, f, p, dv = shape
  if f < 2:
    raise ValueError(f"features: the frame bucket F = {f} must hold at least 2 frames for cubing")
  if p != s.tokens_per_frame:
    raise ValueError(f"features: {p} tokens per frame, expected grid_size² = {s.tokens_per_frame}")
  if dv != s.vision_dim:
    raise ValueError(f"features: width {dv}, expected vision_dim = {s.vision_dim}")


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


class Compressor(nnx.Module):
  """Cubing + resampler + thumbnail over a validated `CompressorConfig` (`validate(config).model.compressor`,
  kept as `settings`). The `cubing` kind of the registry (qv_jax/model/compressors/)."""

  needs_question = False

  def __init__(self, config: CompressorConfig, *, rngs: nnx.Rngs):
    expect(config, CompressorConfig, type(self).__name__)
    validate_compressor(config)
    s = config
    self.settings = s
    self.dtype = jnp.dtype(s.dtype)
    param_dtype = jnp.dtype(s.param_dtype)
    self.cubing = Cubing(s.vision_dim, alpha=s.momentum_alpha, layer_norm_eps=s.mlp_layer_norm_eps,
                         dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
    self.thumbnail = Dense(s.vision_dim, s.embed_dim, axes=("vision_embed", "embed"), dtype=self.dtype,
                           param_dtype=param_dtype, rngs=rngs)
    self.resampler = Resampler(
        s.vision_dim, s.embed_dim, num_heads=s.num_heads, num_queries=s.num_queries,
        grid_size=s.grid_size, layer_norm_eps=s.resampler_layer_norm_eps,
        pos_temperature=s.pos_temperature, impl=s.resampler_impl, token_chunk=s.token_chunk,
        save_scores=s.save_scores, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, features: jax.Array, num_frames: jax.Array, *, key: jax.Array | None,
               noise_weight=0.0, sample_ids: jax.Array | None = None) -> CompressorOutput:
    """features [B, F, P, Dv] (any float dtype), num_frames [B] int (2 ≤ N_b ≤ F; clipped to that
    range inside a trace), key: the step's Gumbel key (None: no noise), noise_weight: scalar η,
    sample_ids [B] (default arange(B)) fold the per-sample keys. Called outside any trace (eager), the
    inputs are first checked on the host by `check_inputs` and the step runs jitted."""
    s = self.settings
    _check_static(features.shape, s)
    b = features.shape[0]
    if np.shape(num_frames) != (b,):
      raise ValueError(f"num_frames: expected shape ({b},), got {np.shape(num_frames)}")
    if sample_ids is not None and np.shape(sample_ids) != (b,):
      raise ValueError(f"sample_ids: expected shape ({b},), got {np.shape(sample_ids)}")
    params = jax.tree.leaves(nnx.state(self))
    if _is_concrete(features, num_frames, key, noise_weight, sample_ids, *params):
      check_inputs(features, num_frames, s)
      return _compress_jit(self, features, num_frames, key, noise_weight, sample_ids)
    return self.compress(features, num_frames, key, noise_weight, sample_ids)

  def encode(self, inputs) -> CompressorOutput:
    """The registry contract (`compressors.base.CompressorInputs` -> CompressorOutput)."""
    return self(inputs.features, inputs.num_frames, key=inputs.key, noise_weight=inputs.noise_weight,
                sample_ids=inputs.sample_ids)

  def compress(self, features, num_frames, key, noise_weight, sample_ids) -> CompressorOutput:
    """`__call__` without the host checks (the traced body)."""
    s = self.settings
    b, f, _, _ = features.shape
    kmax = max_cubes(f, s.frames_per_cube)
    n = jnp.clip(jnp.asarray(num_frames, jnp.int32), 2, f)
    frame_valid = jnp.arange(f)[None, :] < n[:, None]
    x = constrain(features.astype(self.dtype), FRAME_AXES)
    # padded frames are masked where they are read (here and per chunk in the resampler), so no
    # masked copy of the features is made and non-finite padding cannot leak
    pooled = jnp.where(frame_valid[:, :, None, None], pool_tokens(x, s.thumbnail_pool), 0.0)
    logits = self.cubing(global_frame_means(pooled.mean(axis=2)))             # [B, F-1, 2]
    logit_mask = jnp.arange(f - 1)[None, :] < (n - 1)[:, None]
    inner = gumbel.inner_boundaries(n, s.frames_per_cube)
    if s.partition == "gumbel":
      keys = None
      if key is not None:
        ids = jnp.arange(b, dtype=jnp.int32) if sample_ids is None else jnp.asarray(sample_ids, jnp.int32)
        keys = gumbel.sample_keys(key, ids)
      probs = gumbel.boundary_probs(logits, keys, noise_weight, s.gumbel_tau)
      hard = gumbel.topk_boundaries(jax.lax.stop_gradient(probs), logit_mask, inner, kmax - 1)
      rows = gumbel.straight_through(hard, probs, logit_mask)
    else:
      hard = gumbel.uniform_boundaries(n, inner, f - 1, kmax - 1)
      rows = hard
    boundary = jnp.concatenate([jnp.ones((b, 1), rows.dtype), rows], axis=1)
    hard_boundary = jnp.concatenate([jnp.ones((b, 1), hard.dtype), hard], axis=1)
    cube_ids, cube_mask, cube_start = cube_partition(hard_boundary, n, kmax)

    thumb = thumbnail_features(pooled, boundary)
    thumbnail = self.thumbnail(thumb.astype(self.dtype))
    tokens = self.resampler(x, cube_ids, frame_valid, num_cubes=kmax)
    tokens = jnp.where(cube_mask[:, :, None, None], tokens, 0).astype(self.dtype)
    return CompressorOutput(
        thumbnail=constrain(thumbnail, ("activation_batch", "activation_queries", "activation_embed")),
        cube_tokens=tokens, cube_mask=cube_mask, cube_start=cube_start, cube_ids=cube_ids,
        boundary=boundary, logits=logits, logit_mask=logit_mask,
        aux_loss=aux_norm_loss(logits, logit_mask))

  def encode_images(self, features: jax.Array) -> jax.Array:
    """[B, I, P, Dv] images / crops -> [B, I, Q, D]: each one a single-frame cube at time position 0."""
    s = self.settings
    if features.ndim != 4 or features.shape[2] != s.tokens_per_frame or features.shape[3] != s.vision_dim:
      raise ValueError(f"features: expected [B, I, {s.tokens_per_frame}, {s.vision_dim}], "
                       f"got shape {tuple(features.shape)}")
    b, i = features.shape[:2]
    x = features.reshape(b * i, 1, *features.shape[2:]).astype(self.dtype)
    ones = jnp.ones((b * i, 1), bool)
    out = self.resampler(x, jnp.zeros((b * i, 1), jnp.int32), ones, num_cubes=1,
                         frame_positions=jnp.zeros((1,), jnp.int32))
    return out.reshape(b, i, *out.shape[2:])


_compress_jit = nnx.jit(lambda module, *args: module.compress(*args))
