"""The one compile path of the train step, shared by the trainer, the benchmark, the planner and the tests.

    jitted = jit_train_step(step_fn, spec, batch_shardings)
    compiled = compile_train_step(step_fn, spec, state, batch)      # state/batch concrete or abstract

`state` and `batch` may be concrete arrays or ShapeDtypeStructs carrying their shardings (see
`train_state_spec` and `abstract_batch`), so the same call compiles for the local devices or, ahead of time,
for a TPU topology's compile-only devices without touching any device.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qv_jax.batch import batch_shapes
from qv_jax.sharding import data_sharding


def jit_train_step(step_fn, spec, batch_shardings: dict):
  """jit with the state's shardings in and out, the state donated, metrics replicated."""
  rep = NamedSharding(spec.mesh, PartitionSpec())
  return jax.jit(step_fn, in_shardings=(spec.shardings, batch_shardings),
                 out_shardings=(spec.shardings, rep), donate_argnums=(0,))


def compile_train_step(step_fn, spec, state, batch: dict) -> Any:
  """-> the compiled executable of `jit_train_step` for `state` and `batch` (arrays or abstract)."""
  jitted = jit_train_step(step_fn, spec, {k: v.sharding for k, v in batch.items()})
  return jitted.lower(state, batch).compile()


def abstract_batch(config, mesh, batch_size: int | None = None, num_frames: int | None = None,
                   rules=None) -> dict:
  """The global batch as ShapeDtypeStructs sharded over (data, fsdp) like `loop.to_global` makes it."""
  b = int(config.data.batch_size if batch_size is None else batch_size)
  f = int(max(config.data.frame_buckets) if num_frames is None else num_frames)
  rules = config.sharding_rules if rules is None else rules
  return {k: jax.ShapeDtypeStruct(shape, np.dtype(dtype),
                                  sharding=data_sharding(mesh, len(shape), rules, shape=shape))
          for k, (shape, dtype) in batch_shapes(config, b, f).items()}
