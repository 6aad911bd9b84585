"""Stacked layers, the one way the vision tower and the decoder build and run their N layers.

    self.layers = stack_layers(lambda rngs: Layer(..., rngs=rngs), num_layers, rngs)
    carry, ys = scan_layers(self.layers, lambda layer, carry, x: layer(carry, x), carry, xs, remat=True)

`stack_layers` builds N copies of one layer as one module whose every variable has a leading [N] axis and
the logical name `layers` prepended to its `logical_axes` (so the param tree is the layer's, each leaf
[N, ...]; the converters' tables and checkpoints use that layout). Layer i is initialised under `jax.vmap`
from `nnx.Rngs(params=jax.random.split(rngs.params(), N)[i])`: the values `nnx.split_rngs` + `nnx.vmap`
give, built as plain JAX over the layer's state, so it traces the same under `nnx.eval_shape`, the jitted
sharded init of `create_sharded` and `jax.set_mesh`. `scan_layers` runs the stack by `lax.scan` over the
split state (one layer compiled once, optionally under `jax.checkpoint` with a remat policy) or unrolled.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

LAYER_AXIS = "layers"


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
                 rngs: nnx.Rngs) -> nnx.Module:
  """`make_layer(rngs)` × num_layers as one module with stacked [num_layers, ...] variables. Draws one key
  from `rngs.params()`; `make_layer` must build the same structure for every key."""
  keys = jax.random.split(rngs.params(), num_layers)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_layer(nnx.Rngs(0))))
  state = jax.vmap(lambda key: nnx.state(make_layer(nnx.Rngs(params=key))))(keys)
  for _, var in nnx.to_flat_state(state):
    axes = var.get_metadata().get("logical_axes")
    if axes is not None:
      var.set_metadata(logical_axes=(LAYER_AXIS,) + tuple(axes))
  return nnx.merge(graphdef, state)


def checkpoint_policy(name: str) -> Callable | None:
  """The `jax.checkpoint` policy of a `REMAT_POLICIES` name: None for "nothing_saveable" (jax's own default,
  the same partial evaluation) and for "none" (no rematerialisation, so no policy)."""
  return None if name in ("nothing_saveable", "none") else getattr(jax.checkpoint_policies, name)


def scan_layers(layers: nnx.Module, step: Callable, carry: Any, xs: Any = None, *, remat: bool = False,
                policy: Callable | None = None, prevent_cse: bool = True, unroll: bool = False
                ) -> tuple[Any, Any]:
  """Runs `step(layer, carry, x) -> (carry, y)` through the stacked `layers` -> (carry, ys [N, ...]).

  xs: a pytree whose leaves have the leading [N] axis (layer i gets slice i), or None. remat: each layer's
  step under `jax.checkpoint(policy=policy, prevent_cse=prevent_cse)` (policy None saves nothing).
  unroll: a Python loop over the N layers instead of `lax.scan` (the ys stacked the same way)."""
  graphdef, state = nnx.split(layers)

  def body(carry, layer_xs):
    layer_state, x = layer_xs
    return step(nnx.merge(graphdef, layer_state), carry, x)

  if remat:
    body = jax.checkpoint(body, policy=policy, prevent_cse=prevent_cse)
  if not unroll:
    return jax.lax.scan(body, carry, (state, xs))
  ys = []
  for i in range(num_stacked(layers)):
    carry, y = body(carry, jax.tree.map(lambda a: a[i], (state, xs)))
    ys.append(y)
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def num_stacked(layers: nnx.Module) -> int:
  """N, the leading axis of a stacked module's variables."""
  return int(jax.tree.leaves(nnx.state(layers))[0].shape[0])


def unstack_layer_state(layers, num_layers: int) -> tuple[Any, list]:
  """A stacked layer state -> (empty placeholders of the same structure, one state per layer)."""
  per_layer = [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(num_layers)]
  return jax.tree.map(lambda a: jnp.zeros((0,), a.dtype), layers), per_layer
