"""COMPRESSOR_TABLE / convert_compressor against an independent PyTorch reference of Cubing + Resampler
(written here from SPEC §3-§4 with torch.nn.MultiheadAttention / LayerNorm / AvgPool2d), fp32, η = 0."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from configs.quicksviewer import get_config
from qv_jax.config import validate
from qv_jax.convert.compressor_map import COMPRESSOR_TABLE
from qv_jax.convert.mapping import MappingError, load_into
from qv_jax.convert.parts import convert_compressor
from qv_jax.model.compressor import Compressor


def sincos_table_np(d, frames, grid):
  """SPEC §4: [t 2/8 | row 3/8 | col 3/8], each [sin | cos] with ω_i = 1/10000^(i/(d/2)), float64."""
  def one(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    ang = np.asarray(pos, np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)
  t, r, c = np.meshgrid(np.arange(frames), np.arange(grid), np.arange(grid), indexing="ij")
  emb = np.concatenate([one(d // 8 * 2, t.ravel()), one(d // 8 * 3, r.ravel()), one(d // 8 * 3, c.ravel())], 1)
  return emb.reshape(frames, grid, grid, d)


class TorchResampler(nn.Module):
  def __init__(self, d, dv, heads, queries, grid):
    super().__init__()
    self.grid = grid
    self.query = nn.Parameter(torch.randn(queries, d))
    self.kv_proj = nn.Linear(dv, d, bias=False)
    self.attn = nn.MultiheadAttention(d, heads)
    self.ln_q, self.ln_kv, self.ln_post = (nn.LayerNorm(d, eps=1e-6) for _ in range(3))
    self.proj = nn.Parameter(d ** -0.5 * torch.randn(d, d))
    with torch.no_grad():
      for ln in (self.ln_q, self.ln_kv, self.ln_post):
        ln.weight.add_(0.3 * torch.randn_like(ln.weight))
        ln.bias.add_(0.3 * torch.randn_like(ln.bias))
      self.attn.in_proj_bias.normal_(0, 0.2)
      self.attn.out_proj.bias.normal_(0, 0.2)

  def forward(self, x, start, end):                      # x [1, L, Dv], frames [start, end)
    d = self.query.shape[1]
    pos = torch.from_numpy(sincos_table_np(d, end, self.grid)[start:end].reshape(-1, d)).float()
    kv = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)     # [L, 1, D]
    q = self.ln_q(self.query)[:, None]                    # [Q, 1, D]
    out = self.attn(q, kv + pos[:, None], kv, need_weights=False)[0].permute(1, 0, 2)
    return self.ln_post(out) @ self.proj                  # [1, Q, D]


class TorchCubing(nn.Module):
  def __init__(self, dv, d):
    super().__init__()
    self.agg_frame_fn = nn.Sequential(nn.Linear(dv, dv))
    self.proj_fn = nn.Sequential(nn.LayerNorm(dv), nn.Linear(dv, dv), nn.GELU(), nn.Linear(dv, 2))
    self.thumbnail_fn = nn.Sequential(nn.AvgPool2d((9, 1), stride=(9, 1)), nn.Linear(dv, d))

  def forward(self, v, resampler, fpq=5, tau=0.5):       # v [N, P, Dv]; λ = 0
    n = v.shape[0]
    mom = [v[1] - v[0]]
    for t in range(2, n):
      mom.append(0.8 * (v[t] - v[t - 1]) + 0.2 * mom[-1])
    z = self.proj_fn(self.agg_frame_fn(torch.stack(mom)).mean(1))        # [N-1, 2]
    k = max(round(n / fpq) - 1, 1)
    p = torch.softmax(z / tau, dim=-1)[:, 1]
    hard = torch.zeros_like(p).scatter(0, torch.topk(p, k).indices, 1.0)
    zhat = torch.cat([torch.ones(1), hard - p.detach() + p])
    starts = [0] + [t for t in range(1, n) if zhat[t] != 0]
    bounds = list(zip(starts, starts[1:] + [n]))
    cubes = [resampler(v[s:e].reshape(1, -1, v.shape[-1]), s, e)[0] for s, e in bounds]
    thumb = (v * zhat[:, None, None]).sum(0) / zhat.sum().item()
    return z, zhat, self.thumbnail_fn(thumb[None])[0], torch.stack(cubes), bounds


class Reference(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.cubing = TorchCubing(c.vision_dim, c.embed_dim)
    self.vision_resampler = TorchResampler(c.embed_dim, c.vision_dim, c.num_heads, c.num_queries, c.grid_size)


@pytest.fixture(scope="module")
def reference():
  torch.manual_seed(0)
  config = get_config("size=tiny")
  return config, Reference(config.model.compressor).eval()


def test_table_covers_every_reference_tensor(reference):
  _, ref = reference
  names = list(ref.state_dict())
  assert len(names) == 23
  for name in names:
    assert any(r._regex.fullmatch(name) for r in COMPRESSOR_TABLE), name


@pytest.mark.parametrize("impl", ["fast", "plain"])
def test_converted_weights_reproduce_reference(reference, impl):
  config, ref = reference
  config.model.compressor.resampler_impl = impl
  c = config.model.compressor
  tensors = {f"model.{k}": v.detach().numpy() for k, v in ref.state_dict().items()}
  model = Compressor(validate(config).model.compressor, rngs=nnx.Rngs(1))
  load_into(model, convert_compressor(tensors, validate(config).model))

  frames, p = 16, c.grid_size ** 2
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2, frames, p, c.vision_dim)).astype(np.float32)
  counts = [13, 16]
  out = model(jnp.asarray(feats), jnp.asarray(counts, jnp.int32), key=jax.random.key(5), noise_weight=0.0)
  for b, n in enumerate(counts):
    with torch.no_grad():
      z, zhat, thumb, cubes, bounds = ref.cubing(torch.from_numpy(feats[b, :n]), ref.vision_resampler)
    k1 = len(bounds)
    assert k1 == max(round(n / 5) - 1, 1) + 1
    np.testing.assert_allclose(np.asarray(out.logits[b, :n - 1]), z.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.boundary[b, :n]), zhat.numpy())
    np.testing.assert_array_equal(np.asarray(out.cube_start[b, :k1]), [s for s, _ in bounds])
    assert np.asarray(out.cube_mask[b]).sum() == k1
    np.testing.assert_allclose(np.asarray(out.thumbnail[b]), thumb.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.cube_tokens[b, :k1]), cubes.numpy(), rtol=1e-4, atol=2e-5)
  norms = np.concatenate([np.linalg.norm(np.asarray(out.logits[b, :n - 1]), axis=-1) for b, n in enumerate(counts)])
  np.testing.assert_allclose(float(out.aux_loss), norms.mean(), rtol=1e-5)


def test_encode_images_matches_reference_at_t0(reference):
  config, ref = reference
  c = config.model.compressor
  tensors = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  model = Compressor(validate(config).model.compressor, rngs=nnx.Rngs(1))
  load_into(model, convert_compressor(tensors))            # dims inferred from the tensors
  imgs = np.random.default_rng(1).normal(size=(2, 3, c.grid_size ** 2, c.vision_dim)).astype(np.float32)
  out = np.asarray(model.encode_images(jnp.asarray(imgs)))
  with torch.no_grad():
    want = np.stack([[ref.vision_resampler(torch.from_numpy(imgs[b, i])[None], 0, 1)[0].numpy()
                      for i in range(3)] for b in range(2)])
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=2e-5)


def test_mapping_errors_list_names_and_shapes(reference):
  config, ref = reference
  tensors = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  missing = dict(tensors)
  del missing["cubing.proj_fn.3.bias"]
  with pytest.raises(MappingError, match=r"cubing/fc2/bias: \(2,\)"):
    convert_compressor(missing, validate(config).model)
  extra = dict(tensors, **{"vision_resampler.extra.weight": np.zeros(3)})
  with pytest.raises(MappingError, match=r"vision_resampler\.extra\.weight"):
    convert_compressor(extra, validate(config).model)
  bad = dict(tensors)
  bad["vision_resampler.proj"] = np.zeros((64, 32), np.float32)
  with pytest.raises(MappingError, match=r"resampler/proj: got \(64, 32\), expected \(64, 64\)"):
    convert_compressor(bad, validate(config).model)
  # the non-persistent sincos buffer is ignored if present
  table = dict(tensors, **{"vision_resampler.pos_embed": np.zeros((2, 6, 6, 64), np.float32)})
  assert len(convert_compressor(table, validate(config).model)) == 27
  assert math.isfinite(float(np.sum(convert_compressor(tensors)["resampler/q_proj/kernel"])))
