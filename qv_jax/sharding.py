"""Sharding by logical axis names: the mesh, the rules table, sharded creation and constraints.

Parameters carry their logical axis names as the variable metadata `logical_axes` (see `param`), not as
Flax's `out_sharding`, so modules can be built anywhere (tests, eval_shape) and are placed on devices only
by `create_sharded`. Large activations are pinned with `constrain(x, ("activation_batch", ...))`, a no-op
when no mesh is active. Params and activations have separate names (weights `embed`, activations
`activation_embed`; docs/configs_and_sharding.md). The rules live in the config (`config.sharding_rules`,
default `qv_jax.config.mesh.LOGICAL_AXIS_RULES`); `axis_rules(rules)` makes them current for `constrain`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qv_jax.config.errors import ConfigError
from qv_jax.config.mesh import ACTIVATION_AXIS_RULES, LOGICAL_AXIS_RULES, MESH_AXES

jax.config.update("jax_threefry_partitionable", True)

Axes = Sequence[str | None]
Rules = Sequence[tuple[str, Any]]

ACTIVATION_PREFIX = "activation_"

# Activation layouts used by several modules.
HIDDEN_AXES = ("activation_batch", "activation_length", "activation_embed")                # [B, L, D]
SLOT_AXES = ("activation_batch", "activation_length")                                      # [B, L]
QUERY_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
MLP_AXES = ("activation_batch", "activation_length", "activation_mlp")                     # [B, L, F]
LOGIT_AXES = ("activation_batch", "activation_length", "activation_vocab")                 # [B, L, V]
FRAME_AXES = ("activation_batch", "activation_frames", "activation_tokens", "activation_vision_embed")

# A param (or a constrained activation) at least this large that stays replicated over a mesh axis its
# rules name (the axis does not divide the dimension) is logged once as a warning: memory and FLOPs the
# mesh was meant to split.
REPLICATED_WARN_BYTES = 1 << 20

log = logging.getLogger(__name__)
_warned: set[tuple] = set()


class _RulesContext(threading.local):
  rules: tuple = tuple(LOGICAL_AXIS_RULES)


_CURRENT = _RulesContext()


def with_activation_rules(rules: Rules) -> tuple:
  """`rules` as a tuple; a table from before the activation names (no `activation_*` entry, e.g. the
  `sharding_rules` of an older config.json) gets `activation_X` = its rule for `X`, which is how such a
  table sharded activations. An empty table stays empty (everything replicated)."""
  rules = tuple(tuple(r) for r in rules)
  if not rules or any(str(name).startswith(ACTIVATION_PREFIX) for name, _ in rules):
    return rules
  old = dict(rules)
  return rules + tuple((name, old.get(name[len(ACTIVATION_PREFIX):])) for name, _ in ACTIVATION_AXIS_RULES)


@contextlib.contextmanager
def axis_rules(rules: Rules):
  """Makes `rules` the table `constrain` and `logical_to_pspec` use by default."""
  old = _CURRENT.rules
  _CURRENT.rules = with_activation_rules(rules)
  try:
    yield
  finally:
    _CURRENT.rules = old


def current_rules() -> tuple:
  return _CURRENT.rules


def param(initializer: Callable, key: jax.Array, shape: Sequence[int], axes: Axes,
          dtype: Any = np.float32) -> nnx.Param:
  """An `nnx.Param` of `initializer(key, shape, dtype)` tagged with logical `axes` (one per dim)."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
  return nnx.Param(initializer(key, tuple(shape), dtype), logical_axes=tuple(axes))


def tagged(value: jax.Array, axes: Axes) -> nnx.Param:
  """An `nnx.Param` holding `value`, tagged with logical `axes`."""
  if len(axes) != np.ndim(value):
    raise ValueError(f"logical axes {tuple(axes)} do not match shape {np.shape(value)}")
  return nnx.Param(value, logical_axes=tuple(axes))


def _mesh_axis_size(mesh, axis) -> int:
  names = axis if isinstance(axis, tuple) else (axis,)
  return math.prod(mesh.shape[n] for n in names)


def logical_to_pspec(axes: Axes | None, rules: Rules | None = None, mesh=None,
                     shape: Sequence[int] | None = None, dropped: list | None = None) -> PartitionSpec:
  """Maps logical names to a PartitionSpec. A mesh axis is used at most once; with `mesh` and `shape`,
  a dimension that the mesh axes do not divide stays replicated over them (tiny test configs on 8
  devices); each such (dim, logical name, mesh axes left out) is appended to `dropped` when given."""
  if axes is None:
    return PartitionSpec()
  table = dict(with_activation_rules(rules) if rules is not None else _CURRENT.rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    target = table.get(name) if name is not None else None
    if target is None:
      out.append(None)
      continue
    target = tuple(target) if isinstance(target, (tuple, list)) else (target,)
    if mesh is not None:
      target = tuple(t for t in target if t in mesh.shape and mesh.shape[t] > 1)
    target = tuple(t for t in target if t not in used)
    if mesh is not None and shape is not None:
      wanted = target
      while target and shape[i] % _mesh_axis_size(mesh, target) != 0:
        target = target[:-1]
      if dropped is not None and len(target) < len(wanted):
        dropped.append((i, name, wanted[len(target):]))
    if not target:
      out.append(None)
      continue
    used.update(target)
    out.append(target[0] if len(target) == 1 else target)
  return PartitionSpec(*out)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, context, tensor) mesh from the axis sizes of a `MeshConfig` or a dict (a missing axis
  is 1); one size may be -1 (the rest)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = dict(mesh_config.to_dict() if hasattr(mesh_config, "to_dict") else mesh_config)
  sizes = {a: int(sizes[a]) if a in sizes else 1 for a in MESH_AXES}
  known = math.prod(s for s in sizes.values() if s != -1)
  if any(s == -1 for s in sizes.values()):
    if len(devices) % known:
      raise ConfigError("mesh", f"{sizes} does not divide the {len(devices)} devices")
    sizes = {a: (len(devices) // known if s == -1 else s) for a, s in sizes.items()}
  if math.prod(sizes.values()) != len(devices):
    raise ConfigError("mesh", f"{sizes} needs {math.prod(sizes.values())} devices, "
                              f"but {len(devices)} are present")
  grid = np.asarray(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
  return Mesh(grid, MESH_AXES)


def _variable_pspec(var, mesh, rules, path: str = "?") -> PartitionSpec:
  axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
  value = var.get_value() if isinstance(var, nnx.Variable) else var
  shape = getattr(value, "shape", None)
  dropped = []
  spec = logical_to_pspec(axes, rules, mesh, shape, dropped)
  if dropped:
    _warn_replicated(f"param {path}", tuple(shape), getattr(value, "dtype", None), dropped, mesh)
  return spec


def _warn_replicated(what: str, shape: tuple, dtype, dropped: list, mesh, key: tuple | None = None) -> None:
  nbytes = math.prod(shape) * (np.dtype(dtype).itemsize if dtype is not None else 4)
  key = (key or (what, shape)) + (tuple(dropped), tuple(mesh.shape.items()))
  if nbytes < REPLICATED_WARN_BYTES or key in _warned:
    return
  _warned.add(key)
  why = "; ".join(f"dim {i} ({name!r}, size {shape[i]}) is not divisible by mesh axes {axes} of size "
                  f"{_mesh_axis_size(mesh, axes)}" for i, name, axes in dropped)
  log.warning("%s %s (%.1f MiB) stays replicated where its rules shard it: %s", what, list(shape),
              nbytes / 2**20, why)


def state_shardings(state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """A NamedSharding for every leaf of an nnx State (abstract or concrete), from `logical_axes`. A param
  of at least REPLICATED_WARN_BYTES left replicated over a mesh axis that does not divide it is logged."""
  def one(path, var):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    return NamedSharding(mesh, _variable_pspec(var, mesh, rules, name))
  return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh, rules: Rules | None = None):
  """Builds `factory()` directly into its shardings: eval_shape, then a jitted init with out_shardings,
  so no parameter is ever materialised whole on one device."""
  abstract = nnx.eval_shape(factory)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  def init():
    return nnx.split(factory())[1]

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """`with_sharding_constraint` by logical (`activation_*`) names under the current mesh; a no-op without
  one. A dimension the mesh does not divide stays replicated: from REPLICATED_WARN_BYTES of the global
  array that is logged as for params, once per (logical name, dimension size, mesh axes left out)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  dropped = []
  spec = logical_to_pspec(axes, None, mesh, x.shape, dropped)
  if dropped:
    _warn_replicated(f"activation {tuple(axes)}", tuple(x.shape), x.dtype, dropped, mesh,
                     key=("activation",) + tuple(x.shape[i] for i, _, _ in dropped))
  return jax.lax.with_sharding_constraint(x, spec)


def data_sharding(mesh: Mesh, ndim: int, rules: Rules | None = None,
                  shape: Sequence[int] | None = None) -> NamedSharding:
  """Sharding of a batch array [B, ...]: `activation_batch` (data, fsdp), the rest replicated. With the
  global `shape`, mesh axes that do not divide B are dropped (a batch of 1 on a context-only mesh)."""
  axes = ("activation_batch",) + (None,) * (ndim - 1)
  return NamedSharding(mesh, logical_to_pspec(axes, rules, mesh, shape))


def _host(device) -> tuple[int, int]:
  return (int(device.process_index), getattr(device, "slice_index", 0) or 0)


@functools.lru_cache(maxsize=64)
def _row_groups(mesh: Mesh) -> tuple[tuple[tuple[int, int], ...], ...]:
  """The mesh's hosts (process, slice) grouped by the batch shards their devices hold, groups ordered by
  their lowest host."""
  names = list(mesh.axis_names)
  fsdp = mesh.shape.get("fsdp", 1)
  held: dict[tuple[int, int], set[int]] = {}
  for idx in np.ndindex(mesh.devices.shape):
    pos = dict(zip(names, idx))
    held.setdefault(_host(mesh.devices[idx]), set()).add(pos.get("data", 0) * fsdp + pos.get("fsdp", 0))
  by_shards: dict[frozenset, list] = {}
  for host, shards in held.items():
    by_shards.setdefault(frozenset(shards), []).append(host)
  sets = list(by_shards)
  for i, a in enumerate(sets):
    for b in sets[i + 1:]:
      if len(a) != len(b) or a & b:
        ha, hb = min(by_shards[a]), min(by_shards[b])
        raise ConfigError("mesh", f"{dict(mesh.shape)}: host {ha[0]} (slice {ha[1]}) holds batch shards "
                                  f"{sorted(a)} of data x fsdp and host {hb[0]} (slice {hb[1]}) holds "
                                  f"{sorted(b)}; hosts must hold the same or disjoint shards, equally many")
  return tuple(sorted(tuple(sorted(hosts)) for hosts in by_shards.values()))


def loading_groups(mesh: Mesh, process_index: int | None = None) -> tuple[int, int]:
  """(G, g): hosts whose devices hold the same batch rows (the same data x fsdp shards; context and tensor
  may span hosts) form one loading group and load identical rows; G groups, numbered by their lowest host
  (g == process_index when every host is its own group), g that of `process_index` (default: this
  process). The global batch is G x the rows each host loads. ConfigError when two hosts hold overlapping
  but different shards, or unequally many."""
  groups = _row_groups(mesh)
  me = jax.process_index() if process_index is None else int(process_index)
  for g, hosts in enumerate(groups):
    if any(p == me for p, _ in hosts):
      return len(groups), g
  raise ConfigError("mesh", f"process {me} holds no device of mesh {dict(mesh.shape)}")


def process_loading_group(mesh_config) -> tuple[int, int]:
  """This process's (G, g) on the mesh `train` builds from all devices (`make_mesh(mesh_config)`);
  (1, 0) in a single process."""
  if jax.process_count() == 1:
    return 1, 0
  return loading_groups(make_mesh(mesh_config))
