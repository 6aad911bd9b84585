"""SigLIP vision tower: parity with transformers through the converter, the 27→24 interpolation, chunked
and rematerialised frame encoding, logical axes, sharding and bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from transformers import SiglipVisionConfig, SiglipVisionModel

from configs.quicksviewer import get_config
from qv_jax.config import validate
from qv_jax import sharding
from qv_jax.convert.cli import convert
from qv_jax.convert.writer import load_converted
from qv_jax.model.vision_tower import (SiglipVisionTower, bilinear_weights, interpolate_grid,
                                       normalize_pixels)


def tiny_model_config(**vision):
  config = get_config("size=tiny")
  config.model.vision.update(vision)
  return validate(config).model


def torch_resize(tokens: np.ndarray, grid_in: int, grid_out: int) -> np.ndarray:
  n, _, d = tokens.shape
  x = torch.from_numpy(tokens).reshape(n, grid_in, grid_in, d).permute(0, 3, 1, 2)
  y = F.interpolate(x, size=(grid_out, grid_out), mode="bilinear", align_corners=False)
  return y.permute(0, 2, 3, 1).reshape(n, grid_out * grid_out, d).numpy()


@pytest.mark.parametrize("grid_in,grid_out", [(27, 24), (7, 6), (9, 4), (5, 5), (6, 7)])
def test_interpolation_matches_torch_bilinear(grid_in, grid_out):
  tokens = np.random.RandomState(grid_in).randn(2, grid_in * grid_in, 5).astype(np.float32)
  ours = np.asarray(interpolate_grid(jnp.asarray(tokens), grid_in, grid_out))
  np.testing.assert_allclose(ours, torch_resize(tokens, grid_in, grid_out), atol=1e-5)


def test_bilinear_weights_27_to_24_follow_the_spec_formula():
  w = bilinear_weights(27, 24)
  i = np.arange(24)
  src = 1.125 * i + 0.0625
  lo = np.floor(src).astype(int)
  expected = np.zeros((24, 27))
  expected[i, lo] = 1 - (src - lo)
  expected[i, lo + 1] = src - lo
  np.testing.assert_allclose(w, expected, atol=1e-7)
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)


def test_normalize_pixels():
  x = jnp.asarray([0, 51, 255], jnp.uint8)
  np.testing.assert_allclose(np.asarray(normalize_pixels(x)), [-1.0, -0.6, 1.0], atol=1e-6)


HF_CONFIGS = [
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=98,
         patch_size=14),
    # 60 px / 8 = 7 patches with 4 px cut by the VALID conv; 3 heads of 16; non-default eps.
    dict(hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3, image_size=60,
         patch_size=8, layer_norm_eps=1e-5),
]


@pytest.fixture(scope="module", params=range(len(HF_CONFIGS)))
def hf_siglip(request, tmp_path_factory):
  torch.manual_seed(request.param)
  hf_config = SiglipVisionConfig(**HF_CONFIGS[request.param])
  model = SiglipVisionModel(hf_config).eval()
  with torch.no_grad():   # HF initialises biases and LN to constants; make every tensor informative
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  src = tmp_path_factory.mktemp("siglip")
  model.save_pretrained(src, safe_serialization=True)
  out = tmp_path_factory.mktemp("converted")
  convert(src, out, progress=False, overwrite=True)
  return model, hf_config, out


def test_parity_with_transformers_through_the_converter(hf_siglip):
  model, hf_config, out = hf_siglip
  config, _ = load_converted(out)
  v = config.model.vision
  assert (v.hidden_size, v.num_layers, v.num_heads, v.layer_norm_eps) == (
      hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.num_attention_heads,
      hf_config.layer_norm_eps)
  config = config.replace(model=dict(compute_dtype="float32"))
  tower = SiglipVisionTower(config.model.vision, rngs=nnx.Rngs(0))
  _, params = load_converted(out, nnx.state(tower), part="vision_tower", strict=True)
  nnx.update(tower, params)

  s = hf_config.image_size
  pixels = np.random.RandomState(1).uniform(-1, 1, (3, 3, s, s)).astype(np.float32)
  with torch.no_grad():
    outputs = model(torch.from_numpy(pixels), output_hidden_states=True)
  last = outputs.hidden_states[-1].numpy()       # last layer, before post_layernorm
  x = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  hidden = np.asarray(tower.hidden_states(x))
  assert np.abs(hidden - last).max() <= 1e-4
  assert np.abs(hidden - outputs.last_hidden_state.numpy()).max() > 1e-2   # post-LN is not what we use
  grid = s // hf_config.patch_size
  resized = np.asarray(tower(x))
  assert resized.shape == (3, v.grid_out ** 2, hf_config.hidden_size)
  assert np.abs(resized - torch_resize(last, grid, v.grid_out)).max() <= 1e-4


def test_converted_weights_equal_the_source_layouts(hf_siglip):
  model, hf_config, out = hf_siglip
  _, params = load_converted(out, part="vision_tower")
  sd = {k: t.numpy() for k, t in model.state_dict().items()}
  np.testing.assert_array_equal(params["patch_embed"]["kernel"],
                                sd["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["layers"]["self_attn"]["q_proj"]["kernel"][1],
                                sd["encoder.layers.1.self_attn.q_proj.weight"].T)
  np.testing.assert_array_equal(params["layers"]["layer_norm2"]["scale"][0],
                                sd["encoder.layers.0.layer_norm2.weight"])
  report = json.loads((out / "conversion.json").read_text())
  assert "post_layernorm.weight" in report["sources"][0]["ignored"]
  assert "head.probe" in report["sources"][0]["ignored"]


def _random_tower(model_config, seed=0):
  tower = SiglipVisionTower(model_config.vision, rngs=nnx.Rngs(seed))
  state = nnx.state(tower)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  nnx.update(tower, jax.tree.unflatten(treedef, noisy))
  return tower


def test_encode_frames_equals_per_frame_call_with_padding_chunks_and_uint8():
  mc = tiny_model_config(frame_chunk=2)
  tower = _random_tower(mc)
  frames = np.random.RandomState(0).randint(0, 256, (2, 5, 98, 98, 3)).astype(np.uint8)
  ours = np.asarray(tower.encode_frames(jnp.asarray(frames)))
  per_frame = np.asarray(tower(normalize_pixels(jnp.asarray(frames.reshape(10, 98, 98, 3)))))
  assert ours.shape == (2, 5, 36, 32)
  np.testing.assert_allclose(ours.reshape(10, 36, 32), per_frame, atol=1e-5)
  floats = np.asarray(tower.encode_frames(normalize_pixels(jnp.asarray(frames))))
  np.testing.assert_allclose(floats, ours, atol=1e-5)


def test_remat_changes_neither_values_nor_gradients():
  pixels = jnp.asarray(np.random.RandomState(2).uniform(-1, 1, (1, 3, 98, 98, 3)).astype(np.float32))
  results = []
  for remat in (True, False):
    tower = _random_tower(tiny_model_config(frame_chunk=2, remat=remat))
    graphdef, state = nnx.split(tower)

    def loss(state):
      feats = nnx.merge(graphdef, state).encode_frames(pixels)
      return jnp.sum(jnp.sin(feats))

    value, grads = jax.jit(jax.value_and_grad(loss))(state)
    results.append((value, grads))
  (v1, g1), (v2, g2) = results
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  assert float(jnp.abs(g1["layers"]["mlp"]["fc1"]["kernel"].get_value()).max()) > 0


def test_every_param_has_logical_axes_and_stacked_layers():
  tower = nnx.eval_shape(lambda: SiglipVisionTower(validate(get_config("size=qwen2_7b")).model.vision, rngs=nnx.Rngs(0)))
  flat = dict(nnx.to_flat_state(nnx.state(tower)))
  assert len(flat) == 19
  for path, var in flat.items():
    axes = var.get_metadata()["logical_axes"]
    assert len(axes) == var.get_value().ndim, path
    if path[0] == "layers":
      assert axes[0] == "layers" and var.get_value().shape[0] == 27, path
  assert flat[("patch_embed", "kernel")].get_value().shape == (14, 14, 3, 1152)
  assert flat[("position_embedding",)].get_value().shape == (729, 1152)
  assert flat[("layers", "mlp", "fc1", "kernel")].get_metadata()["logical_axes"] == (
      "layers", "vision_embed", "vision_mlp")
  assert flat[("layers", "self_attn", "q_proj", "kernel")].get_metadata()["logical_axes"] == (
      "layers", "vision_embed", "heads")


def test_released_size_shapes_without_allocating():
  tower = nnx.eval_shape(lambda: SiglipVisionTower(validate(get_config("size=qwen2_7b")).model.vision, rngs=nnx.Rngs(0)))
  out = jax.eval_shape(lambda t, x: t.encode_frames(x), tower, jax.ShapeDtypeStruct((1, 20, 384, 384, 3),
                                                                                    jnp.uint8))
  assert out.shape == (1, 20, 576, 1152) and out.dtype == jnp.bfloat16


def test_sharded_encode_frames_equals_single_device():
  mc = tiny_model_config(frame_chunk=2)
  tower = _random_tower(mc)
  pixels = jnp.asarray(np.random.RandomState(3).uniform(-1, 1, (4, 3, 98, 98, 3)).astype(np.float32))
  expected = np.asarray(tower.encode_frames(pixels))

  config = get_config("size=tiny")
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config.mesh)
  sharded = sharding.create_sharded(lambda: SiglipVisionTower(mc.vision, rngs=nnx.Rngs(0)), mesh)
  nnx.update(sharded, jax.device_put(nnx.state(tower), sharding.state_shardings(nnx.state(sharded), mesh)))
  kernel = nnx.state(sharded)["layers"]["mlp"]["fc1"]["kernel"].get_value()
  assert kernel.sharding.spec[2] == "tensor"   # vision_mlp over the tensor axis
  graphdef, state = nnx.split(sharded)
  with jax.set_mesh(mesh):
    x = jax.device_put(pixels, sharding.data_sharding(mesh, pixels.ndim))
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_frames(x))(state, x)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32():
  mc = tiny_model_config()
  tower = _random_tower(mc)
  pixels = jnp.asarray(np.random.RandomState(4).uniform(-1, 1, (2, 98, 98, 3)).astype(np.float32))
  ref = np.asarray(tower(pixels))
  mc_bf16 = dataclasses.replace(tiny_model_config(), compute_dtype="bfloat16")
  tower_bf16 = SiglipVisionTower(mc_bf16.vision, rngs=nnx.Rngs(0))
  nnx.update(tower_bf16, nnx.state(tower))
  out = tower_bf16(pixels)
  assert out.dtype == jnp.bfloat16
  scale = np.abs(ref).max()
  assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.05 * scale


@pytest.mark.parametrize("shape,method", [((2, 96, 96, 3), "__call__"), ((2, 98, 98), "__call__"),
                                          ((2, 98, 98, 3), "encode_frames")])
def test_bad_pixel_shapes_name_the_expected_shape(shape, method):
  tower = SiglipVisionTower(tiny_model_config().vision, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"expected \[(N|B, F), 98, 98, 3\]"):
    getattr(tower, method)(jnp.zeros(shape, jnp.float32))


def test_converted_params_restore_into_a_sharded_tower(hf_siglip):
  _, _, out = hf_siglip
  config, host = load_converted(out, part="vision_tower")
  config = config.replace(mesh=dict(data=2, fsdp=2, tensor=2))
  mesh = sharding.make_mesh(config.mesh)
  tower = sharding.create_sharded(lambda: SiglipVisionTower(config.model.vision, rngs=nnx.Rngs(0)), mesh)
  target = nnx.state(tower)
  _, params = load_converted(out, target, part="vision_tower", strict=True)
  got = params["layers"]["mlp"]["fc1"]["kernel"]
  want = target["layers"]["mlp"]["fc1"]["kernel"].get_value()
  assert got.sharding == want.sharding and got.dtype == jnp.float32
  assert got.sharding.spec[2] == "tensor"
  np.testing.assert_array_equal(np.asarray(got), host["layers"]["mlp"]["fc1"]["kernel"])
