"""`model.vision.gather_once`: under FSDP the vision tower's weights are all-gathered once per step instead
of in every frame-chunk x layer iteration (the planner's finding, docs/planner.md), with the same values and
gradients."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.quicksviewer import get_config
from qv_jax.config import validate
from qv_jax import sharding
from qv_jax.config.mesh import MESH_AXES
from qv_jax.model.vision_tower import SiglipVisionTower
from qv_jax.plan import hlo


def _run(gather_once: bool, pixels):
  config = get_config("size=tiny")
  config.model.vision.update(frame_chunk=2, gather_once=gather_once)
  config.mesh.update(data=1, fsdp=8, tensor=1)
  mesh = sharding.make_mesh(config.mesh)
  tower = sharding.create_sharded(lambda: SiglipVisionTower(validate(config).model.vision, rngs=nnx.Rngs(0)), mesh)
  graphdef, state = nnx.split(tower)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  state = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype).astype(x.dtype)
                                    for k, x in zip(keys, leaves)])
  assert nnx.state(tower)["layers"]["mlp"]["fc1"]["kernel"].get_value().sharding.spec[1] == "fsdp"

  def loss(state, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, state).encode_frames(x)))

  with jax.set_mesh(mesh):
    x = jax.device_put(pixels, sharding.data_sharding(mesh, pixels.ndim))
    fn = jax.jit(jax.value_and_grad(loss))
    text = fn.lower(state, x).compile().as_text()
    value, grads = fn(state, x)
  gathers = [c for c in hlo.collectives(text, (1, 8, 1, 1), MESH_AXES) if c.kind == "all-gather"]
  return value, grads, sum(c.count for c in gathers)


def test_gather_once_keeps_values_and_gradients_and_gathers_fewer_times():
  pixels = jnp.asarray(np.random.RandomState(4).uniform(-1, 1, (8, 6, 98, 98, 3)).astype(np.float32))
  v0, g0, n0 = _run(False, pixels)
  v1, g1, n1 = _run(True, pixels)
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):   # the same sums in another order (fp32, ~5e4 terms)
    scale = float(np.abs(np.asarray(b)).max())
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=max(1e-6 * scale, 1e-5))
  assert float(jnp.abs(g1["layers"]["mlp"]["fc1"]["kernel"].get_value()).max()) > 0
  # 3 chunks x 2 layers re-gather the layer weights (forward and remat) without it; once per weight with it
  assert n1 < n0, (n1, n0)
