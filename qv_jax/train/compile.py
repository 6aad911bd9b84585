"""The one compile path of the train step, shared by the trainer, the benchmark, the planner and the tests.

    jitted = jit_train_step(step_fn, spec, batch_shardings)
    compiled = compile_train_step(step_fn, spec, state, batch)      # state/batch concrete or abstract

`state` and `batch` may be concrete arrays or ShapeDtypeStructs carrying their shardings (see
`train_state_spec` and `abstract_batch`), so the same call compiles for the local devices or, ahead of time,
for a TPU topology's compile-only devices without touching any device.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qv_jax.batch import batch_shapes, packed_batch_shapes, packed_layout, sequence_buckets
from qv_jax.sharding import data_sharding


def jit_train_step(step_fn, spec, batch_shardings: dict):
  """jit with the state's shardings in and out, the state donated, metrics replicated."""
  rep = NamedSharding(spec.mesh, PartitionSpec())
  return jax.jit(step_fn, in_shardings=(spec.shardings, batch_shardings),
                 out_shardings=(spec.shardings, rep), donate_argnums=(0,))


def compile_train_step(step_fn, spec, state, batch: dict, timings: dict | None = None,
                       compile: Callable | None = None) -> Any:
  """-> the compiled executable of `jit_train_step` for `state` and `batch` (arrays or abstract). With a
  `timings` dict, the seconds of its phases go into it: trace_s (jaxpr), lower_s (StableHLO), xla_compile_s,
  and xla_compile_cpu_s, the process's CPU seconds (all threads) in XLA's compile: the work, apart from how
  loaded the host is (the TPU backend compiles its fusions on parallel threads). `compile(lowered, timings)`
  replaces `lowered.compile()` (the planner's cache, `qv_jax/plan/cache.py`) and records its own timings."""
  jitted = jit_train_step(step_fn, spec, {k: v.sharding for k, v in batch.items()})
  t0 = time.perf_counter()
  traced = jitted.trace(state, batch)
  t1 = time.perf_counter()
  lowered = traced.lower()
  if timings is not None:
    timings.update(trace_s=t1 - t0, lower_s=time.perf_counter() - t1)
  if compile is not None:
    return compile(lowered, timings if timings is not None else {})
  t2, c2 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  if timings is not None:
    timings.update(xla_compile_s=time.perf_counter() - t2, xla_compile_cpu_s=time.process_time() - c2)
  return compiled


def abstract_batch(config, mesh, batch_size: int | None = None, num_frames: int | None = None,
                   rules=None, seq_len: int | None = None) -> dict:
  """The global batch as ShapeDtypeStructs sharded over (data, fsdp) like `loop.to_global` makes it.

  With data.seq_buckets or data.pack_samples > 1 it is the packed layout of `qv_jax/batch.py` (what
  `data_pipeline/packing.py` collates): `batch_size` counts rows of data.pack_samples slots and `seq_len` is
  the sequence bucket N (default: the largest of data.seq_buckets, else data.max_seq_len)."""
  b = int(config.data.batch_size if batch_size is None else batch_size)
  f = int(max(config.data.frame_buckets) if num_frames is None else num_frames)
  rules = config.sharding_rules if rules is None else rules
  if packed_layout(config.data):
    n = int(max(sequence_buckets(config.data)) if seq_len is None else seq_len)
    shapes = packed_batch_shapes(config, b, f, n)
  else:
    shapes = batch_shapes(config, b, f)
  return {k: jax.ShapeDtypeStruct(shape, np.dtype(dtype),
                                  sharding=data_sharding(mesh, len(shape), rules, shape=shape))
          for k, (shape, dtype) in shapes.items()}
