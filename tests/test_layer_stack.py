"""The one way to stack layers (`qv_jax/layers/stack.py`): the values, tree and logical names of the
`nnx.split_rngs` + `nnx.vmap` construction the vision tower used, and one runner for scanned, unrolled and
rematerialised layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qv_jax.layers import Dense, LayerNorm
from qv_jax.layers.stack import scan_layers, stack_layers

N = 3


class Block(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.norm = LayerNorm(8, eps=1e-6, axis_name="embed", rngs=rngs)
    self.up = Dense(8, 16, axes=("embed", "mlp"), rngs=rngs)
    self.down = Dense(16, 8, axes=("mlp", "embed"), use_bias=False, rngs=rngs)

  def __call__(self, x, scale=1.0):
    return x + scale * self.down(jnp.tanh(self.up(self.norm(x))))


def _split_rngs_vmap(rngs):
  """The tower's former construction."""
  @nnx.split_rngs(splits=N)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
  def make(rngs):
    return Block(rngs)
  return make(rngs)


def _flat(module):
  return {path: (np.asarray(v.get_value()), v.get_metadata().get("logical_axes"))
          for path, v in nnx.to_flat_state(nnx.state(module))}


@pytest.mark.parametrize("make_rngs", [lambda: nnx.Rngs(0), lambda: nnx.Rngs(params=7)])
def test_stack_layers_matches_split_rngs_and_vmap(make_rngs):
  rngs_a, rngs_b = make_rngs(), make_rngs()
  got, want = stack_layers(Block, N, rngs_a), _split_rngs_vmap(rngs_b)
  flat_got, flat_want = _flat(got), _flat(want)
  assert flat_got.keys() == flat_want.keys()
  for path, (value, axes) in flat_want.items():
    assert value.shape[0] == N and flat_got[path][1] == axes and axes[0] == "layers", (path, axes)
    np.testing.assert_array_equal(flat_got[path][0], value, err_msg=str(path))
  assert not np.array_equal(flat_got[("up", "kernel")][0][0], flat_got[("up", "kernel")][0][1])
  assert jax.random.key_data(rngs_a.params()).tolist() == jax.random.key_data(rngs_b.params()).tolist()


def test_scan_layers_scanned_unrolled_and_remat_agree():
  layers = stack_layers(Block, N, nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (2, 5, 8))
  scales = jnp.array([0.5, 1.0, 2.0])

  def step(layer, h, scale):
    h = layer(h, scale)
    return h, h.sum()

  want = x
  for i in range(N):
    want = nnx.merge(nnx.graphdef(layers), jax.tree.map(lambda a: a[i], nnx.state(layers)))(want, scales[i])
  for kw in (dict(), dict(unroll=True), dict(remat=True, prevent_cse=False),
             dict(remat=True, policy=jax.checkpoint_policies.dots_saveable, unroll=True)):
    out, sums = scan_layers(layers, step, x, scales, **kw)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6, err_msg=str(kw))
    assert sums.shape == (N,)
    np.testing.assert_allclose(sums[-1], want.sum(), rtol=1e-5, err_msg=str(kw))

  def loss(state, **kw):
    return scan_layers(nnx.merge(nnx.graphdef(layers), state), step, x, scales, **kw)[0].sum()
  g_plain = jax.grad(loss)(nnx.state(layers))
  g_remat = jax.grad(lambda s: loss(s, remat=True))(nnx.state(layers))
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
