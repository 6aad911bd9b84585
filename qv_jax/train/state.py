"""The train state and its sharded creation.

`TrainState` holds pure nested dicts: `params` (the stage's trainable parameters), `frozen` (every other
model variable), the optax state over `params` only, the optimizer step and the base RNG key. The model
is rebuilt inside the step with `nnx.merge(graphdef, params, frozen)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qv_jax.model.quicksviewer import Quicksviewer
from qv_jax.sharding import create_sharded, state_shardings
from qv_jax.train.optimizer import make_optimizer
from qv_jax.train.stages import split_model, trainable_filter, trainable_groups


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: optimizer steps completed in this stage
  params: dict           # trainable params (pure nested dict)
  frozen: dict           # frozen params and other variables
  opt_state: Any         # optax state over `params`
  rng: jax.Array         # uint32 [2] base key; the step's key is fold_in(rng, step)


@dataclasses.dataclass
class StateSpec:
  """What the step needs besides the state: the module structure, the optimizer and the shardings."""
  graphdef: Any
  tx: optax.GradientTransformation
  groups: tuple[str, ...]
  shardings: TrainState
  mesh: Mesh


def model_factory(config) -> Callable[[], Quicksviewer]:
  seed = int(config.train.seed)
  return lambda: Quicksviewer(config.model, max_seq_len=config.data.max_seq_len, rngs=nnx.Rngs(params=seed))


def merge_trees(a: dict, b: dict) -> dict:
  """Union of two nested dicts with disjoint leaves."""
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(a, keep_empty_nodes=True),
                                       **traverse_util.flatten_dict(b, keep_empty_nodes=True)})


def replace_leaves(base: dict, update: dict) -> dict:
  """`base` with the leaves present in `update` replaced (update's paths must exist in base)."""
  flat, new = traverse_util.flatten_dict(base), traverse_util.flatten_dict(update)
  unknown = sorted("/".join(map(str, p)) for p in new.keys() - flat.keys())
  if unknown:
    raise KeyError(f"params not in the model: {unknown[:5]}")
  return traverse_util.unflatten_dict({**flat, **new})


def split_tree(full: dict, like: dict) -> tuple[dict, dict]:
  """Splits `full` into (the leaves present in `like`, the rest)."""
  paths = traverse_util.flatten_dict(like).keys()
  flat = traverse_util.flatten_dict(full)
  return (traverse_util.unflatten_dict({p: v for p, v in flat.items() if p in paths}),
          traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in paths}))


def _replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def abstract_params(config, mesh: Mesh, rules=None, groups=None):
  """-> (graphdef, abstract trainable, abstract frozen): pure dicts of ShapeDtypeStructs carrying the
  shardings the config's rules give them. Nothing is allocated."""
  rules = rules if rules is not None else config.sharding_rules
  groups = trainable_groups(config) if groups is None else groups
  graphdef, train, frozen = nnx.split(nnx.eval_shape(model_factory(config)), trainable_filter(groups), ...)

  def spec(st):
    return abstract_like(nnx.to_pure_dict(st), nnx.to_pure_dict(state_shardings(st, mesh, rules)))
  return graphdef, spec(train), spec(frozen)


def opt_state_shardings(abstract_opt, abstract_params: dict, default: NamedSharding):
  """A sharding for every leaf of an (abstract) optax state: a leaf whose key path ends with a param's path
  and has its shape (Adam's mu and nu, ...) takes that param's sharding; the rest (counts) `default`.
  Runs no `init`, so it works for a topology's compile-only devices."""
  by_path = {tuple(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  longest = max((len(p) for p in by_path), default=0)

  def one(path, leaf):
    for start in range(max(len(path) - longest, 0), len(path)):
      param = by_path.get(tuple(path[start:]))
      if param is not None and tuple(param.shape) == tuple(leaf.shape):
        return param.sharding
    return default
  return jax.tree_util.tree_map_with_path(one, abstract_opt)


def train_state_spec(config, mesh: Mesh, rules=None) -> tuple[TrainState, StateSpec]:
  """The abstract train state (ShapeDtypeStructs with their shardings) and the spec. Allocates nothing and
  touches no device (the optimizer state's shape comes from `jax.eval_shape`), so `mesh` may be made of a
  TPU topology's compile-only devices."""
  rules = rules if rules is not None else config.sharding_rules
  groups = trainable_groups(config)
  graphdef, abs_train, abs_frozen = abstract_params(config, mesh, rules, groups)
  tx = make_optimizer(config.train)
  rep = _replicated(mesh)
  param_shardings = jax.tree.map(lambda x: x.sharding, abs_train)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, abs_frozen)
  abstract_opt = jax.eval_shape(tx.init, abs_train)
  opt_shardings = opt_state_shardings(abstract_opt, abs_train, rep)
  shardings = TrainState(step=rep, params=param_shardings, frozen=frozen_shardings, opt_state=opt_shardings,
                         rng=rep)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=abs_train,
                        frozen=abs_frozen, opt_state=abstract_like(abstract_opt, opt_shardings),
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))
  return abstract, StateSpec(graphdef=graphdef, tx=tx, groups=groups, shardings=shardings, mesh=mesh)


def create_train_state(config, mesh: Mesh, rules=None, params_loader: Callable[[dict], dict] | None = None,
                       partial: bool = False) -> tuple[TrainState, StateSpec]:
  """Builds the model directly into its shardings (or, with `params_loader`, restores it there: the loader
  gets the abstract full param dict with shardings and returns the arrays; with `partial` it may return only
  some of them, the rest keeping their fresh initialisation), splits it by the stage's groups and
  initialises the optimizer over the trainable part, sharded like the params."""
  rules = rules if rules is not None else config.sharding_rules
  abstract, spec = train_state_spec(config, mesh, rules)
  if params_loader is None or partial:
    model = create_sharded(model_factory(config), mesh, rules)
    _, params, frozen = split_model(model, spec.groups)
    del model
    if params_loader is not None:
      loaded = params_loader(merge_trees(abstract.params, abstract.frozen))
      params, frozen = split_tree(replace_leaves(merge_trees(params, frozen), loaded), abstract.params)
  else:
    params, frozen = split_tree(params_loader(merge_trees(abstract.params, abstract.frozen)), abstract.params)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(spec.tx.init, out_shardings=spec.shardings.opt_state)(params)
  rep = spec.shardings.step
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params, frozen=frozen,
                     opt_state=opt_state,
                     rng=jax.device_put(jax.random.PRNGKey(int(config.train.seed) + 1), rep))
  return state, spec


def full_params(state: TrainState) -> dict:
  """Every model variable as one pure nested dict (what checkpoints store)."""
  return merge_trees(state.params, state.frozen)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying shardings, for restoring into place."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
