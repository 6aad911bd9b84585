"""Config validation and the sharding helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.quicksviewer import get_config
from qv_jax import sharding
from qv_jax.config import ConfigError, validate
from qv_jax.layers import Dense


@pytest.mark.parametrize("size,d,heads", [("qwen2_7b", 3584, 28), ("llama3_8b", 4096, 32), ("tiny", 64, 4)])
def test_released_sizes(size, d, heads):
  c = validate(get_config(f"size={size},stage=1"))
  assert c.model.compressor.embed_dim == d == c.model.decoder.hidden_size
  assert c.model.compressor.num_heads == heads


@pytest.mark.parametrize("field,value,needle", [
    ("model.compressor.embed_dim", 60, "multiple of 8"),
    ("model.compressor.num_heads", 3, "do not divide"),
    ("model.compressor.partition", "random", "partition"),
    ("train.stage", 4, "unknown stage"),
    ("data.max_frames", 1, "at least 2 frames"),
])
def test_bad_config_names_field(field, value, needle):
  c = get_config("size=tiny")
  section, *rest = field.split(".")
  node = c[section]
  for k in rest[:-1]:
    node = node[k]
  node[rest[-1]] = value
  with pytest.raises(ConfigError, match=needle) as err:
    validate(c)
  assert err.value.field.endswith(rest[-1]) or err.value.field == field


def test_unknown_size_and_argument():
  with pytest.raises(ConfigError, match="unknown size"):
    get_config("size=huge")
  with pytest.raises(ConfigError, match="expected size"):
    get_config("colour=red")


def test_logical_to_pspec_rules():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.logical_to_pspec(("embed", "mlp"), None, mesh, (16, 32)) == jax.sharding.PartitionSpec("fsdp", "tensor")
  # a dimension the mesh axis does not divide stays replicated
  assert sharding.logical_to_pspec(("embed", "mlp"), None, mesh, (3, 32)) == jax.sharding.PartitionSpec(None, "tensor")
  assert sharding.logical_to_pspec(("activation_batch", None), None, mesh, (8, 3)) == jax.sharding.PartitionSpec(("data", "fsdp"), None)


def test_mesh_must_match_devices():
  with pytest.raises(ConfigError, match="needs 12 devices, but 8"):
    sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
  assert sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1}).shape["data"] == 4


def test_create_sharded_matches_unsharded():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  factory = lambda: Dense(16, 32, axes=("embed", "mlp"), rngs=nnx.Rngs(3))
  plain = factory()
  sharded = sharding.create_sharded(factory, mesh)
  kernel = sharded.kernel.get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(plain.kernel.get_value()))
  with jax.set_mesh(mesh):
    y = nnx.jit(lambda m, x: sharding.constrain(m(x), ("activation_batch", "activation_mlp")))(sharded, jnp.ones((8, 16)))
  np.testing.assert_allclose(np.asarray(y), np.asarray(plain(jnp.ones((8, 16)))), rtol=1e-6)
