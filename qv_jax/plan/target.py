"""The target of a plan: a TPU topology's compile-only devices, its hosts and a (data, fsdp, tensor) mesh
over them. Nothing here touches a device.

    target = load_target("v5p:4x4x8", num_slices=1)
    mesh = target_mesh(target, (1, 128, 1))
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np
from jax.sharding import Mesh

from qv_jax.config.errors import ConfigError
from qv_jax.config.mesh import MESH_AXES
from qv_jax.plan.chips import CHIPS, Chip

INSTALL_HINT = ("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]' "
                "(or: pip install libtpu==0.0.42.1)")
_NAME = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+){1,2})$")


@dataclasses.dataclass
class Target:
  topology: str
  num_slices: int
  chip: Chip
  dims: tuple[int, ...]         # the slice's chip grid, e.g. (4, 4, 8)
  devices: list                 # compile-only devices, slice-major
  num_hosts: int

  @property
  def num_chips(self) -> int:
    return len(self.devices)


# Google Cloud accelerator types -> their default slice shapes (cloud.google.com/tpu/docs/v5p, /v5e, /v6e).
# v5p types count TensorCores (2 per chip: v5p-256 is 128 chips); v5e (v5litepod-N) and v6e types count chips.
_V5P_TYPES = {8: "2x2x1", 16: "2x2x2", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8", 1024: "8x8x8",
              2048: "8x8x16", 4096: "8x16x16", 8192: "16x16x16", 12288: "16x16x24"}
_LITE_TYPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_TYPE = re.compile(r"^(v5p|v5litepod|v5e|v6e)-(\d+)$")


def canonical_topology(name: str) -> str:
  """A Google Cloud accelerator type ('v5p-256', 'v5litepod-16', 'v6e-8') -> its libtpu topology
  ('v5p:4x4x8', 'v5e:4x4', 'v6e:2x4'); a '<chip>:<grid>' name is returned as it is."""
  m = _TYPE.match((name or "").strip().lower())
  if not m:
    return name
  kind, n = m.group(1), int(m.group(2))
  kind = "v5e" if kind == "v5litepod" else kind
  table = _V5P_TYPES if kind == "v5p" else _LITE_TYPES
  if n not in table:
    unit = "TensorCores, 2 per chip" if kind == "v5p" else "chips"
    raise ConfigError("--topology", f"{name!r}: no default shape for {n} {unit}; known: "
                                    f"{', '.join(f'{m.group(1)}-{k}' for k in table)}, or give the grid "
                                    f"({kind}:AxB{'xC' if kind == 'v5p' else ''})")
  return f"{kind}:{table[n]}"


def accelerator_type(chip: Chip, dims: tuple[int, ...]) -> str:
  """The Google Cloud accelerator type of a slice ('v5p-256' for v5p:4x4x8), or '' if it has none."""
  grid = "x".join(str(d) for d in dims)
  if chip.name == "v5p":
    cores = {v: k for k, v in _V5P_TYPES.items()}.get(grid)
    return f"v5p-{cores}" if cores else ""
  chips = {v: k for k, v in _LITE_TYPES.items()}.get(grid)
  return (f"v5litepod-{chips}" if chip.name == "v5e" else f"{chip.name}-{chips}") if chips else ""


def display_name(topology: str) -> str:
  """'v5p:4x4x8' -> 'v5p:4x4x8 (v5p-256)': the grid and, where it has one, the Cloud TPU type to order."""
  chip, dims = parse_topology(topology)
  acc = accelerator_type(chip, dims)
  return f"{topology} ({acc})" if acc else topology


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
  """'v5p:4x4x8' (or the accelerator type 'v5p-256') -> (the chip, (4, 4, 8)); a ConfigError naming
  --topology otherwise."""
  m = _NAME.match(canonical_topology(name) or "")
  if not m:
    raise ConfigError("--topology", f"{name!r}; expected <chip>:<AxB[xC]>, e.g. v5e:4x4 or v5p:4x4x8, or a "
                                    "Cloud TPU accelerator type (v5p-256, v5litepod-16, v6e-8)")
  kind, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
  if kind not in CHIPS:
    raise ConfigError("--topology", f"unknown chip {kind!r} in {name!r}; known: {sorted(CHIPS)}")
  if any(d < 1 for d in dims):
    raise ConfigError("--topology", f"{name!r} has an empty dimension")
  return CHIPS[kind], dims


def _host_bounds(chip: Chip, dims: tuple[int, ...]) -> tuple[int, int, int]:
  full = tuple(dims) + (1,) * (3 - len(dims))
  if chip.name in ("v5e", "v6e") and math.prod(dims) <= 8:
    return full                               # one host holds the whole small slice
  return (2, 2, 1)


def load_target(topology: str, num_slices: int = 1) -> Target:
  """The topology's devices from libtpu (compile-only; no TPU needed). `topology`: '<chip>:<grid>' or an
  accelerator type (`canonical_topology`); the target carries the '<chip>:<grid>' name."""
  topology = canonical_topology(topology)
  chip, dims = parse_topology(topology)
  if int(num_slices) < 1:
    raise ConfigError("--num-slices", f"must be >= 1, got {num_slices}")
  # compile-only: several planner processes may load libtpu at once, and no TPU worker is looked up
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  try:
    from jax.experimental import topologies
    import libtpu  # noqa: F401
  except ImportError:
    raise ConfigError("libtpu", INSTALL_HINT) from None
  kwargs = dict(chips_per_host_bounds=_host_bounds(chip, dims))
  if num_slices > 1:
    kwargs["num_slices"] = int(num_slices)
  try:
    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices
  except Exception as e:  # noqa: BLE001  (libtpu reports a bad layout as a runtime error)
    raise ConfigError("--topology", f"{topology!r}: {str(e).splitlines()[0]}") from None
  devices = sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.id))
  hosts = len({(getattr(d, "slice_index", 0) or 0, d.process_index) for d in devices})
  return Target(topology=topology, num_slices=int(num_slices), chip=chip, dims=dims, devices=list(devices),
                num_hosts=hosts)


def check_mesh_shape(shape, num_chips: int) -> tuple[int, int, int, int]:
  """(data, fsdp, tensor) or (data, fsdp, context, tensor), at most one -1, -> (data, fsdp, context, tensor)
  resolved; a ConfigError naming --mesh otherwise."""
  given = shape = tuple(int(s) for s in shape)
  if len(shape) == 3:
    shape = shape[:2] + (1,) + shape[2:]
  if len(shape) != len(MESH_AXES) or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise ConfigError("--mesh", f"{given}; expected data,fsdp,tensor or data,fsdp,context,tensor "
                                f"(one may be -1)")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_chips % known:
      raise ConfigError("--mesh", f"{given} does not divide the {num_chips} chips")
    shape = tuple(num_chips // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_chips:
    raise ConfigError("--mesh", f"{'x'.join(map(str, given))} = {math.prod(shape)} chips, but the target "
                                f"has {num_chips}")
  return shape


def target_mesh(target: Target, shape) -> Mesh:
  """A (data, fsdp, context, tensor) mesh over the target's devices. With several slices the data axis runs across
  slices (outermost), so only data-parallel gradient reductions cross the DCN. Within a slice the device
  order follows `mesh_utils.create_device_mesh` (ICI-friendly when the shape allows it)."""
  shape = check_mesh_shape(shape, target.num_chips)
  per_slice = target.num_chips // target.num_slices
  if target.num_slices > 1:
    if shape[0] % target.num_slices:
      raise ConfigError("--mesh", f"data={shape[0]} must be a multiple of --num-slices={target.num_slices} "
                                  f"(the data axis spans the slices)")
    inner = (shape[0] // target.num_slices,) + shape[1:]
    grids = [_slice_grid(target.devices[i * per_slice:(i + 1) * per_slice], inner)
             for i in range(target.num_slices)]
    grid = np.concatenate(grids, axis=0)
  else:
    grid = _slice_grid(target.devices, shape)
  return Mesh(grid, MESH_AXES)


def _slice_grid(devices, shape) -> np.ndarray:
  from jax.experimental import mesh_utils
  try:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except Exception:  # noqa: BLE001  (shapes the physical mesh cannot embed: plain order)
    return np.asarray(devices).reshape(shape)
