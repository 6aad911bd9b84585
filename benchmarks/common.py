"""Shared benchmark helpers: the machine's matmul peak, compile counting, XLA cost and memory analysis,
timing, and JSON output. Benchmarks print one JSON object per line; they are never tests.

  peak = matmul_peak()                          # FLOP/s of a large fp32 matmul on the default device
  with CompileCounter() as compiles: ...        # compiles.count: backend compilations inside the block
  compiled = jax.jit(f).lower(*args).compile()
  flops(compiled), memory(compiled)             # XLA cost analysis FLOPs; memory_analysis sizes in bytes
  seconds = time_call(compiled, *args)          # median wall time, results blocked on
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Counts XLA backend compilations (jax.monitoring events) while active; `names` lists the functions."""

  def __init__(self):
    self.count = 0
    self.names: list[str] = []

  def _listener(self, event: str, duration: float, **kwargs) -> None:
    if event == COMPILE_EVENT:
      self.count += 1
      self.names.append(str(kwargs.get("fun_name", "?")))

  def __enter__(self) -> "CompileCounter":
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listener)


def block(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def time_call(fn: Callable, *args, warmup: int = 1, repeats: int = 3) -> dict[str, float]:
  """Median / min wall seconds of `fn(*args)` after `warmup` calls, outputs blocked on."""
  for _ in range(warmup):
    block(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def matmul_peak(n: int = 4096, dtype: Any = jnp.float32, repeats: int = 5) -> float:
  """Best FLOP/s of an [n, n] @ [n, n] matmul on the default device (2·n³ FLOPs)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  t = time_call(f, a, b, warmup=1, repeats=repeats)
  return 2.0 * n ** 3 / t["min_s"]


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def flops(compiled) -> float | None:
  """FLOPs from XLA's cost analysis of a compiled function (None if the backend gives none). Note: XLA
  counts a while-loop body once, so a `lax.fori_loop`/`scan` undercounts; compare analytic FLOPs."""
  value = _cost(compiled).get("flops")
  return None if value is None else float(value)


def memory(compiled) -> dict[str, int | None]:
  """Byte sizes from `compiled.memory_analysis()`; peak = arguments + outputs + temporaries - aliased."""
  m = compiled.memory_analysis()
  if m is None:
    return {"peak_bytes": None}
  get = lambda name: int(getattr(m, name, 0) or 0)
  out = {name: get(name) for name in ("argument_size_in_bytes", "output_size_in_bytes",
                                      "temp_size_in_bytes", "alias_size_in_bytes",
                                      "generated_code_size_in_bytes")}
  out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                       + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
  return out


def device_info() -> dict[str, Any]:
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
          "jax": jax.__version__}


def emit(record: dict) -> None:
  """Prints one JSON line and flushes."""
  print(json.dumps(record, sort_keys=True), flush=True)
  sys.stdout.flush()
