"""The SigLIP vision tower (SPEC §2): last encoder layer before post-LayerNorm, 27×27 → 24×24 bilinear.

Pixels are NHWC in [-1, 1] (`normalize_pixels`). A frame goes through a 14×14 stride-14 VALID patch
embedding (384 px → 27×27 = 729 patches), the learned position embedding and `num_layers` pre-LN encoder
layers (gelu tanh approximation). The post-LayerNorm and the attention-pooling head are not built: the
reference discards them. The last layer's output is resized to `grid_out`×`grid_out` tokens with
PyTorch's `F.interpolate(mode='bilinear', align_corners=False)` (half-pixel centres, no antialias), done
as two small separable weight matrices in fp32.

Param tree (paths relative to the tower; in the whole model they start with `vision_tower/`). L layers,
Dv = hidden_size, Dm = intermediate_size, p = patch_size, G = image_size // patch_size:

  patch_embed/kernel                    [p, p, 3, Dv]   (None, None, channels, vision_embed)  HWIO
  patch_embed/bias                      [Dv]            (vision_embed,)
  position_embedding                    [G², Dv]        (tokens, vision_embed)
  layers/layer_norm1/{scale,bias}       [L, Dv]         (layers, vision_embed)
  layers/self_attn/{q,k,v}_proj/kernel  [L, Dv, Dv]     (layers, vision_embed, heads)
  layers/self_attn/{q,k,v}_proj/bias    [L, Dv]         (layers, heads)
  layers/self_attn/out_proj/kernel      [L, Dv, Dv]     (layers, heads, vision_embed)
  layers/self_attn/out_proj/bias        [L, Dv]         (layers, vision_embed)
  layers/layer_norm2/{scale,bias}       [L, Dv]         (layers, vision_embed)
  layers/mlp/fc1/kernel, fc1/bias       [L, Dv, Dm], [L, Dm]   (layers, vision_embed, vision_mlp)
  layers/mlp/fc2/kernel, fc2/bias       [L, Dm, Dv], [L, Dv]   (layers, vision_mlp, vision_embed)

The heads dimension of q/k/v/out kernels is heads·head_dim flattened (head h owns columns
[h·hd, (h+1)·hd)), as in HF. Layers are stacked and run with `lax.scan` (one layer compiled once).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from qv_jax.config.typed import VisionConfig, expect
from qv_jax.layers import Dense, LayerNorm
from qv_jax.layers.stack import checkpoint_policy, scan_layers, stack_layers
from qv_jax.sharding import FRAME_AXES, _variable_pspec, axis_rules, constrain, logical_to_pspec, param

_ROW_AXES = ("activation_batch", "activation_tokens", "activation_vision_embed")    # [N, T, Dv]


def normalize_pixels(frames: jax.Array) -> jax.Array:
  """uint8 RGB [..., S, S, 3] -> float32 in [-1, 1]: (x / 255 - 0.5) / 0.5, the SigLIP processor's
  rescale + normalize with mean = std = 0.5."""
  return (frames.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] fp32 matrix of 1-D bilinear resizing as PyTorch's `interpolate(mode='bilinear',
  align_corners=False)`: source = (i + 0.5)·n_in/n_out − 0.5 clamped at 0, weights (1 − w, w) on
  (floor, floor + 1), the upper index clamped at n_in − 1. 27 → 24: source = 1.125·i + 0.0625."""
  scale = n_in / n_out
  src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  weights = np.zeros((n_out, n_in), np.float64)
  np.add.at(weights, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(weights, (np.arange(n_out), hi), frac)
  return weights.astype(np.float32)


def interpolate_grid(tokens: jax.Array, grid_in: int, grid_out: int) -> jax.Array:
  """[N, grid_in², D] row-major tokens -> [N, grid_out², D] by separable bilinear resizing in fp32,
  cast back to the input dtype. The identity when grid_in == grid_out."""
  if grid_in == grid_out:
    return tokens
  n, _, d = tokens.shape
  w = jnp.asarray(bilinear_weights(grid_in, grid_out))
  x = tokens.astype(jnp.float32).reshape(n, grid_in, grid_in, d)
  x = jnp.einsum("oi,nijd->nojd", w, x)
  x = jnp.einsum("pj,nojd->nopd", w, x)
  return x.reshape(n, grid_out * grid_out, d).astype(tokens.dtype)


class PatchEmbed(nnx.Module):
  """p×p stride-p VALID convolution as one matmul over flattened (kh, kw, c) patches:
  [N, S, S, 3] -> [N, G², Dv]; pixels past G·p (384 − 27·14 = 6) are dropped, as VALID does."""

  def __init__(self, patch_size: int, features: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.patch_size, self.dtype = patch_size, dtype
    init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
    self.kernel = param(init, rngs.params(), (patch_size, patch_size, 3, features),
                        (None, None, "channels", "vision_embed"), param_dtype)
    self.bias = param(nnx.initializers.zeros, rngs.params(), (features,), ("vision_embed",), param_dtype)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    n, s, _, c = pixels.shape
    p = self.patch_size
    g = s // p
    x = pixels[:, :g * p, :g * p].astype(self.dtype).reshape(n, g, p, g, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, p * p * c)
    kernel = self.kernel.get_value().astype(self.dtype).reshape(p * p * c, -1)
    return jnp.matmul(x, kernel) + self.bias.get_value().astype(self.dtype)


class SiglipAttention(nnx.Module):
  """Bidirectional multi-head self-attention: scores and softmax in fp32, scale head_dim^-0.5."""

  def __init__(self, width: int, num_heads: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.num_heads, self.dtype = num_heads, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Dense(width, width, axes=("vision_embed", "heads"), **kw)
    self.k_proj = Dense(width, width, axes=("vision_embed", "heads"), **kw)
    self.v_proj = Dense(width, width, axes=("vision_embed", "heads"), **kw)
    self.out_proj = Dense(width, width, axes=("heads", "vision_embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    n, t, width = x.shape
    h = self.num_heads
    hd = width // h
    q = self.q_proj(x).reshape(n, t, h, hd)
    k = self.k_proj(x).reshape(n, t, h, hd)
    v = self.v_proj(x).reshape(n, t, h, hd)
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, t, width)
    return self.out_proj(out)


class SiglipMLP(nnx.Module):
  def __init__(self, width: int, hidden: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Dense(width, hidden, axes=("vision_embed", "vision_mlp"), **kw)
    self.fc2 = Dense(hidden, width, axes=("vision_mlp", "vision_embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class SiglipEncoderLayer(nnx.Module):
  """Pre-LN: x + attn(LN1(x)), then x + mlp(LN2(x)). [N, T, Dv] -> [N, T, Dv]."""

  def __init__(self, vision: VisionConfig, *, rngs: nnx.Rngs):
    expect(vision, VisionConfig, "SiglipEncoderLayer")
    dtype, param_dtype = jnp.dtype(vision.dtype), jnp.dtype(vision.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ln = dict(eps=vision.layer_norm_eps, axis_name="vision_embed", param_dtype=param_dtype, rngs=rngs)
    self.layer_norm1 = LayerNorm(vision.hidden_size, **ln)
    self.self_attn = SiglipAttention(vision.hidden_size, vision.num_heads, **kw)
    self.layer_norm2 = LayerNorm(vision.hidden_size, **ln)
    self.mlp = SiglipMLP(vision.hidden_size, vision.intermediate_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = constrain(x, _ROW_AXES)
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class SiglipVisionTower(nnx.Module):
  """SigLIP features per frame: `__call__(pixels [N, S, S, 3]) -> [N, grid_out², Dv]`.

  config: a `VisionConfig` (`validate(config).model.vision`, with the model's dtypes).
  """

  def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
    expect(config, VisionConfig, "SiglipVisionTower")
    v = config
    self.dtype = jnp.dtype(v.dtype)
    param_dtype = jnp.dtype(v.param_dtype)
    self.image_size, self.grid_out = int(v.image_size), int(v.grid_out)
    self.grid_in = v.image_size // v.patch_size
    self.frame_chunk, self.remat_policy = int(v.frame_chunk), v.remat_policy
    self.gather_once = bool(v.gather_once)
    self.patch_embed = PatchEmbed(v.patch_size, v.hidden_size, dtype=self.dtype, param_dtype=param_dtype,
                                  rngs=rngs)
    self.position_embedding = param(nnx.initializers.normal(0.02), rngs.params(),
                                    (self.grid_in ** 2, v.hidden_size), ("tokens", "vision_embed"),
                                    param_dtype)

    self.layers = stack_layers(lambda r: SiglipEncoderLayer(v, rngs=r), v.num_layers, rngs)

  @property
  def num_tokens(self) -> int:
    return self.grid_out ** 2

  def _check(self, pixels: jax.Array, rank: int, name: str) -> None:
    s = self.image_size
    if pixels.ndim != rank or tuple(pixels.shape[-3:]) != (s, s, 3):
      lead = "[N, " if rank == 4 else "[B, F, "
      raise ValueError(f"SiglipVisionTower.{name}: pixels of shape {tuple(pixels.shape)}; expected "
                       f"{lead}{s}, {s}, 3] (model.vision.image_size = {s}, NHWC RGB)")

  def hidden_states(self, pixels: jax.Array) -> jax.Array:
    """[N, S, S, 3] in [-1, 1] -> last encoder layer before post-LN, [N, G², Dv] (G = 27 at 384 px)."""
    self._check(pixels, 4, "hidden_states")
    x = self.patch_embed(pixels)
    x = x + self.position_embedding.get_value().astype(self.dtype)
    step = lambda layer, h, _: (layer(h), None)  # noqa: E731
    x, _ = scan_layers(self.layers, step, x, remat=self.remat_policy != "none",
                       policy=checkpoint_policy(self.remat_policy), prevent_cse=False)
    return x

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """[N, S, S, 3] in [-1, 1] -> [N, grid_out², Dv] in the compute dtype."""
    features = interpolate_grid(self.hidden_states(pixels), self.grid_in, self.grid_out)
    return constrain(features, _ROW_AXES)

  def encode_frames(self, pixels: jax.Array) -> jax.Array:
    """[B, F, S, S, 3] -> [B, F, grid_out², Dv], `vision.frame_chunk` frames per sample at a time.

    Chunks run in a `lax.map` (one chunk compiled once), each under remat unless `vision.remat_policy` is
    "none" (the default "nothing_saveable"), so the
    backward pass keeps only chunk outputs plus one chunk's per-layer inputs. uint8 pixels are
    normalised chunk by chunk (`normalize_pixels`); float pixels must already lie in [-1, 1].
    """
    self._check(pixels, 5, "encode_frames")
    b, f, s = pixels.shape[:3]
    chunk = max(1, min(self.frame_chunk, f))
    n = -(-f // chunk)
    if n * chunk != f:
      pixels = jnp.pad(pixels, ((0, 0), (0, n * chunk - f), (0, 0), (0, 0), (0, 0)))
    chunks = pixels.reshape(b, n, chunk, s, s, 3).swapaxes(0, 1)
    graphdef, state = nnx.split(self)

    def run(state, x):
      if x.dtype == jnp.uint8:
        x = normalize_pixels(x)
      tower = nnx.merge(graphdef, state)
      return tower(x.reshape(-1, s, s, 3)).reshape(x.shape[0], chunk, self.num_tokens, -1)

    if self.remat_policy != "none":
      run = jax.checkpoint(run, policy=checkpoint_policy(self.remat_policy))
    loop = lambda st, c: jax.lax.map(lambda x: run(st, x), c)  # noqa: E731
    out = _weights_gathered_once(loop, state, chunks) if self.gather_once else loop(state, chunks)
    out = out.swapaxes(0, 1).reshape(b, n * chunk, self.num_tokens, -1)[:, :f]
    return constrain(out, FRAME_AXES)


def _mesh_axes(spec) -> set:
  return {a for d in spec for a in ((d,) if isinstance(d, str) else (d or ()))}


def _weights_gathered_once(loop, state, chunks: jax.Array) -> jax.Array:
  """`loop(state, chunks [n, B, ...]) -> [n, B, ...]`, run per batch shard with the tower's weights
  all-gathered once before the chunk loop (and their gradients reduce-scattered once after it).

  Under plain SPMD, XLA re-gathers FSDP-sharded weights in every chunk x layer iteration (on TPU partly as
  collective-permute rings, docs/planner.md) and reduces their gradients per iteration. Costs the whole
  tower's weights and gradients per chip. Used when the weights are sharded only over the
  batch's mesh axes (data/fsdp/context: tensor-sharded weights keep the SPMD path); the values are the same."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.manual_axes:
    return loop(state, chunks)
  batch = logical_to_pspec((None, "activation_batch"), None, mesh, chunks.shape[:2])[1]
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  specs = [_variable_pspec(v, mesh, None) for v in jax.tree.leaves(state, is_leaf=is_var)]
  leaves, tree = jax.tree.flatten(state)
  batch_axes = _mesh_axes((batch,))
  used = set().union(*(_mesh_axes(s) for s in specs))
  if not batch_axes or not used or not used <= batch_axes or len(leaves) != len(specs):
    return loop(state, chunks)

  def local(leaves, chunks):
    full = []
    for x, spec in zip(leaves, specs):
      for dim, axes in enumerate(spec):
        if axes:
          x = jax.lax.all_gather(x, axes, axis=dim, tiled=True)
      full.append(x)
    with axis_rules(()):
      return loop(jax.tree.unflatten(tree, full), chunks)

  data = PartitionSpec(None, batch)
  return jax.shard_map(local, in_specs=(specs, data), out_specs=data, check_vma=False)(leaves, chunks)
