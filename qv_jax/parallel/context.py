"""The `context` mesh axis: its size under the current mesh and the shape checks made before compiling."""

from __future__ import annotations

import jax

from qv_jax.config.errors import ConfigError

AXIS = "context"


def context_size(mesh=None) -> int:
  """Size of the `context` axis of `mesh` (default: the current abstract mesh); 1 without one."""
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or AXIS not in mesh.shape:
    return 1
  return int(mesh.shape[AXIS])


def check_divisible(field: str, length: int, context: int) -> None:
  """One line naming `field` when `length` does not split evenly over `context` chips."""
  if context > 1 and length % context:
    raise ConfigError(field, f"{length} is not divisible by the context axis size {context}; pad the "
                             f"frame bucket / sequence to a multiple of {context}")


def check_config(config, mesh=None) -> None:
  """Frame buckets and data.max_seq_len must be multiples of the context size (static shapes); of twice
  it with `model.decoder.context_attention="ring"` (zig-zag chunks)."""
  c = context_size(mesh) if mesh is not None else int(config.mesh.context)
  if c <= 1:
    return
  for f in config.data.frame_buckets:
    check_divisible("data.frame_buckets", int(f), c)
  check_divisible("data.max_seq_len", int(config.data.max_seq_len), c)
  length = int(config.data.max_seq_len)
  if config.model.decoder.context_attention == "ring" and length % (2 * c):
    raise ConfigError("data.max_seq_len", f"{length} is not divisible by 2 x the context axis size {c}, as "
                                          f"model.decoder.context_attention='ring' needs (zig-zag chunks)")
