"""The Compressor as a whole: output contract, sharded step == single-device step, bad inputs."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.quicksviewer import get_config
from qv_jax.config import validate
from qv_jax import sharding
from qv_jax.config import ConfigError
from qv_jax.model.compressor import Compressor, check_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import CompileCounter  # noqa: E402


def tiny(**compressor):
  config = get_config("size=tiny")
  for k, v in compressor.items():
    config.model.compressor[k] = v
  return config


def feats(batch=2, frames=16, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, frames, 36, 32), jnp.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_contract(dtype):
  config = tiny()
  config.model.compute_dtype = dtype
  model = Compressor(validate(config).model.compressor, rngs=nnx.Rngs(0))
  out = model(feats().astype(jnp.bfloat16), jnp.asarray([16, 7], jnp.int32), key=jax.random.key(0),
              noise_weight=1.0, sample_ids=jnp.asarray([10, 11], jnp.int32))
  want = {"thumbnail": ((2, 4, 64), dtype), "cube_tokens": ((2, 3, 4, 64), dtype),
          "cube_mask": ((2, 3), "bool"), "cube_start": ((2, 3), "int32"), "cube_ids": ((2, 16), "int32"),
          "boundary": ((2, 16), "float32"), "logits": ((2, 15, 2), "float32"),
          "logit_mask": ((2, 15), "bool"), "aux_loss": ((), "float32")}
  for name, (shape, dt) in want.items():
    value = getattr(out, name)
    assert value.shape == shape and value.dtype == jnp.dtype(dt), name
  np.testing.assert_array_equal(np.asarray(out.cube_mask), [[True, True, True], [True, True, False]])
  assert np.isfinite(np.asarray(out.cube_tokens, np.float32)).all()
  images = model.encode_images(feats(2, 3))
  assert images.shape == (2, 3, 4, 64) and images.dtype == jnp.dtype(dtype)


def step_fn(graphdef):
  def step(state, x, n, key, ids):
    def loss(state):
      out = nnx.merge(graphdef, state).compress(x, n, key, 0.8, ids)
      return (jnp.mean(jnp.square(out.cube_tokens)) + jnp.mean(jnp.square(out.thumbnail))
              + 1e-3 * out.aux_loss)
    return jax.value_and_grad(loss)(state)
  return step


@pytest.mark.parametrize("impl", ["fast", pytest.param("plain", marks=pytest.mark.slow)])
def test_sharded_step_equals_single_device(impl):
  config = tiny(resampler_impl=impl, token_chunk=36 * 5)           # several frame chunks
  factory = lambda: Compressor(validate(config).model.compressor, rngs=nnx.Rngs(0))
  single = factory()
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = sharding.create_sharded(factory, mesh)
  kernel = sharded.resampler.q_proj.kernel.get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")

  # 2 samples per batch shard: with ONE sample per shard, XLA:CPU (jax 0.10.2) computes wrong weight
  # gradients for [B, T, D] activations on a (2, 2, 2) mesh even for a plain tanh MLP (reported).
  x, n = feats(8, 16, seed=3), jnp.asarray([16, 9, 2, 13, 5, 16, 11, 3], jnp.int32)
  key, ids = jax.random.key(4), jnp.arange(100, 108, dtype=jnp.int32)
  graphdef, state_1 = nnx.split(single)
  loss_1, grad_1 = jax.jit(step_fn(graphdef))(state_1, x, n, key, ids)

  _, state_8 = nnx.split(sharded)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, sharding.data_sharding(mesh, 4))
    ns = jax.device_put(n, sharding.data_sharding(mesh, 1))
    assert xs.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, None, None)
    loss_8, grad_8 = jax.jit(step_fn(graphdef))(state_8, xs, ns, key, ids)
  assert len(xs.sharding.device_set) == 8
  assert float(loss_8) == pytest.approx(float(loss_1), rel=1e-5)
  flat_1, flat_8 = nnx.to_flat_state(grad_1), nnx.to_flat_state(grad_8)
  for (path, g1), (_, g8) in zip(flat_1, flat_8):
    a, b = np.asarray(g1.get_value()), np.asarray(g8.get_value())
    np.testing.assert_allclose(b, a, atol=1e-5 * max(np.abs(a).max(), 1e-3), rtol=1e-4,
                               err_msg="/".join(map(str, path)))


def test_check_inputs_names_the_problem():
  x = np.asarray(feats(3, 8))
  check_inputs(x, np.array([8, 2, 5]))
  with pytest.raises(ValueError, match=r"num_frames\[1\] = 1: a video needs at least 2 frames"):
    check_inputs(x, np.array([8, 1, 5]))
  with pytest.raises(ValueError, match=r"num_frames\[2\] = 9: more frames than the bucket F = 8"):
    check_inputs(x, np.array([8, 2, 9]))
  with pytest.raises(ValueError, match=r"num_frames: expected shape \(3,\)"):
    check_inputs(x, np.array([8, 2]))
  bad = x.copy()
  bad[2, 3, 5, 1] = np.nan
  with pytest.raises(ValueError, match=r"features\[2\]: 1 non-finite values in the 5 valid frames \(first at frame 3\)"):
    check_inputs(bad, np.array([8, 2, 5]))
  bad[2, 3, 5, 1] = 0.0
  bad[1, 6] = np.inf                                       # padding of sample 1: ignored
  check_inputs(bad, np.array([8, 2, 5]))
  with pytest.raises(ValueError, match=r"expected \[B, F, P, Dv\]"):
    check_inputs(x[0], np.array([8]))


def test_eager_call_checks_and_static_errors_come_before_compiling():
  model = Compressor(validate(tiny()).model.compressor, rngs=nnx.Rngs(0))
  x = feats(2, 8)
  with pytest.raises(ValueError, match=r"num_frames\[0\] = 9: more frames than the bucket F = 8"):
    model(x, jnp.asarray([9, 3], jnp.int32), key=None)
  with pytest.raises(ValueError, match=r"features\[1\]: .*non-finite"):
    model(x.at[1, 0, 0, 0].set(jnp.inf), jnp.asarray([8, 3], jnp.int32), key=None)
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda s, x, n: nnx.merge(graphdef, s)(x, n, key=None))
  one_frame, one = feats(2, 1), jnp.asarray([1, 1], jnp.int32)
  narrow, wrong_tokens, eight = jnp.zeros((2, 8, 36, 16)), jnp.zeros((2, 8, 25, 32)), jnp.asarray([8, 8], jnp.int32)
  with CompileCounter() as compiles:
    with pytest.raises(ValueError, match=r"frame bucket F = 1 must hold at least 2 frames"):
      run(state, one_frame, one)
    with pytest.raises(ValueError, match=r"width 16, expected vision_dim = 32"):
      run(state, narrow, eight)
    with pytest.raises(ValueError, match=r"25 tokens per frame, expected grid_size² = 36"):
      run(state, wrong_tokens, eight)
  assert compiles.count == 0
  with pytest.raises(ValueError, match=r"expected \[B, I, 36, 32\]"):
    model.encode_images(jnp.zeros((2, 36, 32)))


@pytest.mark.parametrize("field,value,needle", [
    ("embed_dim", 60, "D=60 must be a positive multiple of 8"),
    ("embed_dim", 40, "D=40: .* multiple of 16"),
    ("num_heads", 3, "3 heads do not divide embed_dim D=64"),
    ("partition", "random", "'random'; expected 'gumbel' or 'uniform'"),
])
def test_bad_config_raises_before_building(field, value, needle):
  with pytest.raises(ConfigError, match=needle) as err:
    Compressor(validate(tiny(**{field: value})).model.compressor, rngs=nnx.Rngs(0))
  assert err.value.field == f"model.compressor.{field}"
