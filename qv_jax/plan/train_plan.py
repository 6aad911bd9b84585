"""Plan one train-step configuration: build the abstract state and batch for a target mesh, compile the
trainer's exact step (`compile_train_step`) and read memory, FLOPs and collectives from the result.

    report = plan_train(config, target, mesh_shape=(1, 128, 1))
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np

from qv_jax.batch import is_packed
from qv_jax.config import Config, validate
from qv_jax.config.errors import ConfigError
from qv_jax.config.mesh import MESH_AXES
from qv_jax.plan import hlo
from qv_jax.plan.cache import PlanCache, cost_stats, memory_stats
from qv_jax.plan.roofline import axis_ici_bandwidth, roofline
from qv_jax.plan.target import Target, target_mesh
from qv_jax.sharding import axis_rules, loading_groups
from qv_jax.train.compile import abstract_batch, compile_train_step
from qv_jax.train.flops import matmul_flops
from qv_jax.train.loop import check_config
from qv_jax.train.state import train_state_spec
from qv_jax.train.step import make_train_step


def apply_overrides(config, *, batch: int | None = None, frames: int | None = None,
                    remat: bool | str | None = None, frame_chunk: int | None = None, mesh_shape=None,
                    pack: int | None = None, seq_len: int | None = None, gather_once: bool | None = None,
                    param_dtype: str | None = None) -> Config:
  """The validated config with the planner's overrides (a new `Config`; None leaves a field as it is).
  `remat`: the tower's `remat_policy` (a REMAT_POLICIES name; True / False: "nothing_saveable" / "none").
  `pack` P switches to the packed layout (docs/packing.md) with P samples per row (1: sequence bucketing
  alone) and `seq_len` is then its sequence bucket; without `pack`, `seq_len` is data.max_seq_len."""
  config = validate(config)
  data, vision, mesh, model = {}, {}, {}, {}
  if batch is not None:
    data["batch_size"] = int(batch)
  if frames is not None:
    data.update(max_frames=int(frames), frame_buckets=(int(frames),))
  if remat is not None:
    vision["remat_policy"] = remat if isinstance(remat, str) else ("nothing_saveable" if remat else "none")
  if frame_chunk is not None:
    vision["frame_chunk"] = int(frame_chunk)
  if gather_once is not None:
    vision["gather_once"] = bool(gather_once)
  if param_dtype is not None:
    model["param_dtype"] = str(param_dtype)
  if pack is not None:
    n = int(seq_len or max(tuple(config.data.seq_buckets) or (config.data.max_seq_len,)))
    data.update(pack_samples=int(pack), seq_buckets=(n,), max_seq_len=max(int(config.data.max_seq_len), n))
  elif seq_len is not None:
    data["max_seq_len"] = int(seq_len)
  if mesh_shape is not None:
    sizes = [int(s) for s in mesh_shape]
    if len(sizes) == 3:
      sizes.insert(2, 1)
    mesh = dict(zip(MESH_AXES, sizes))
  m = dataclasses.replace(config.model, vision=dataclasses.replace(config.model.vision, **vision), **model)
  return validate(dataclasses.replace(config, model=m, data=dataclasses.replace(config.data, **data),
                                      mesh=dataclasses.replace(config.mesh, **mesh)))


def sharded_bytes(tree) -> float:
  """Per-chip bytes of a tree of sharded ShapeDtypeStructs (the largest shard; shards are equal here)."""
  total = 0.0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shard) * np.dtype(x.dtype).itemsize
  return total


def _memory(compiled) -> dict[str, float]:
  out = {f.replace("_size_in_bytes", "_bytes"): v for f, v in memory_stats(compiled).items()}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
                        + out["generated_code_bytes"])
  return out


def _cost(compiled) -> dict[str, float]:
  c = cost_stats(compiled)
  return {"flops": c.get("flops", 0.0), "bytes_accessed": c.get("bytes accessed", 0.0)}


def _slice_mesh_shape(mesh, num_slices: int) -> tuple[int, ...]:
  """The mesh of one slice: multi-slice programs carry slice-local replica groups (the data axis, outermost,
  spans the slices)."""
  shape = tuple(mesh.devices.shape)
  return (shape[0] // num_slices,) + shape[1:]


def check_state_fits(abstract, mesh, target: Target, what: str = "the train state") -> float:
  """Refuses, before the compile, a mesh whose `abstract` tree (train state: params and optimizer state;
  inference: params and KV cache), live for the whole step, alone exceeds a chip's HBM: a certain
  "does not fit" for the price of an abstract build."""
  state = sharded_bytes(abstract)
  if state > target.chip.hbm_bytes:
    shape = ",".join(str(s) for s in mesh.shape.values())
    raise ConfigError("--mesh", f"{shape} on {target.topology} does not fit: {what} alone is "
                                f"{state / 2**30:.1f} GiB per chip of the chip's {target.chip.hbm_bytes / 2**30:.0f} "
                                "GiB (not compiled)")
  return state


def compile_for_target(config, target: Target, mesh_shape, cache: PlanCache | None = None) -> tuple[Any, dict]:
  """Checks the config against the target (one line on error), then compiles abstractly (through `cache`,
  when given: a program compiled before is read back, not recompiled)."""
  mesh = target_mesh(target, mesh_shape)
  config = apply_overrides(config, mesh_shape=tuple(mesh.shape.values()))
  check_config(config, mesh, groups=loading_groups(mesh)[0])   # hosts loading distinct rows
  rules = config.sharding_rules
  t0 = time.perf_counter()
  abstract, spec = train_state_spec(config, mesh, rules)
  state_bytes = check_state_fits(abstract, mesh, target)
  batch = abstract_batch(config, mesh)
  step_fn = make_train_step(spec.graphdef, config, spec.tx)
  phases = {"build_s": time.perf_counter() - t0}
  with jax.set_mesh(mesh), axis_rules(rules):
    compiled = compile_train_step(step_fn, spec, abstract, batch, timings=phases,
                                  compile=cache.compiler(target, mesh) if cache is not None else None)
    t1 = time.perf_counter()
    counted = matmul_flops(step_fn, abstract, batch)
    phases["jaxpr_flops_s"] = time.perf_counter() - t1
  info = dict(mesh=mesh, abstract=abstract, batch=batch, state_bytes=state_bytes, phases=phases,
              matmul_flops=counted, cache_hit=bool(getattr(compiled, "cache_hit", False)))
  return compiled, info


def analyse(compiled, mesh, target: Target, *, flops: float, tokens: float, dcn_bytes: float = 0.0) -> dict:
  """Memory, FLOPs, collectives and the roofline of a compiled step. `flops`: the jaxpr matmul count of
  the whole step (all chips); `tokens`: decoder tokens it processes; `dcn_bytes`: per-chip bytes sent
  across slices (the compiled program's replica groups are slice-local, so the caller models them)."""
  chip, n = target.chip, target.num_chips
  memory = _memory(compiled)
  cost = _cost(compiled)
  text = compiled.as_text()
  colls = hlo.collectives(text, _slice_mesh_shape(mesh, target.num_slices), tuple(mesh.axis_names))
  traffic = hlo.summarize(colls)
  dcn = float(dcn_bytes)
  flops_chip = flops / n
  # XLA counts a loop body once: its bytes are scaled by where the bytes are, each op's bytes times the trip
  # counts of its loops (hlo.hbm_traffic). Rows planned before that scaled them by the jaxpr/XLA FLOP ratio.
  flop_scale = max(flops_chip / cost["flops"], 1.0) if cost["flops"] else 1.0
  weighted, once = hlo.hbm_traffic(text)
  loop_scale = max(weighted / once, 1.0) if once else 1.0
  hbm_bytes = cost["bytes_accessed"] * loop_scale
  ici = {a: b for a, b in traffic["wire_bytes_by_axis"].items() if a != "none"}
  roof = roofline(flops_per_chip=flops_chip, model_flops_per_chip=flops_chip, hbm_bytes_per_chip=hbm_bytes,
                  ici_bytes_by_axis=ici, dcn_bytes=dcn, tokens_per_step=tokens, num_chips=n,
                  peak_flops=chip.peak_bf16_flops, hbm_bw=chip.hbm_bw,
                  ici_bw_by_axis=axis_ici_bandwidth(mesh, chip), dcn_bw=chip.dcn_bw)
  return {
      "topology": target.topology, "num_slices": target.num_slices, "chips": n, "hosts": target.num_hosts,
      "chip": dataclasses.asdict(chip), "mesh": dict(mesh.shape),
      "memory_per_chip": dict(memory, hbm_bytes=chip.hbm_bytes, fits=memory["total_bytes"] <= chip.hbm_bytes,
                              margin_bytes=chip.hbm_bytes - memory["total_bytes"]),
      "flops_per_chip": {"jaxpr_matmul": flops_chip, "xla_cost_analysis": cost["flops"]},
      "hbm_bytes_accessed_per_chip": {"xla_cost_analysis": cost["bytes_accessed"], "loop_weighted": hbm_bytes,
                                      "loop_scale": loop_scale, "flop_scaled": cost["bytes_accessed"] * flop_scale,
                                      "flop_scale": flop_scale},
      "collectives_per_chip": dict(traffic, dcn_wire_bytes=dcn),
      "roofline": roof.as_dict(), "tokens_per_step": tokens,
  }


def plan_train(config, target: Target, mesh_shape, cache: PlanCache | None = None) -> dict:
  """Compiles the train step for `target` with mesh (data, fsdp[, context], tensor) and returns the report.
  `compile_s` is the cost of planning it from scratch (on a cache hit, with the stored compile's times)."""
  compiled, info = compile_for_target(config, target, mesh_shape, cache)
  d = config.data
  # across slices: each chip all-reduces its shard of the fp32 gradients with its peers in the other slices
  grads = sharded_bytes(info["abstract"].params)
  dcn = hlo.wire_bytes("all-reduce", grads, target.num_slices) if target.num_slices > 1 else 0.0
  seq_len = int(info["batch"]["segment_ids"].shape[-1]) if is_packed(info["batch"]) else int(d.max_seq_len)
  t0 = time.perf_counter()
  report = analyse(compiled, info["mesh"], target, flops=info["matmul_flops"],
                   tokens=float(d.batch_size) * seq_len, dcn_bytes=dcn)
  phases = dict(info["phases"], analyse_s=time.perf_counter() - t0)
  report["memory_per_chip"].update(state_bytes=info["state_bytes"],
                                   batch_bytes=sharded_bytes(info["batch"]))
  return dict(report, step="train", size=config.model.size, stage=int(config.train.stage),
              batch=int(d.batch_size), frames=int(max(d.frame_buckets)), max_seq_len=int(d.max_seq_len),
              seq_len=seq_len, pack_samples=int(d.pack_samples) if is_packed(info["batch"]) else 0,
              remat=config.model.vision.remat_policy != "none", remat_policy=config.model.vision.remat_policy,
              frame_chunk=int(config.model.vision.frame_chunk), gather_once=bool(config.model.vision.gather_once),
              grad_accum=int(config.train.grad_accum),
              compile_s=sum(v for k, v in phases.items() if not k.endswith(("_cpu_s", "cache_load_s"))),
              compile_phases_s=phases, cache_hit=info["cache_hit"])


def plan_error(e: Exception) -> str:
  """One line for a planning failure."""
  if isinstance(e, ConfigError):
    return str(e)
  first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return f"{type(e).__name__}: {first[:300]}"


def error_detail(e: Exception, max_lines: int = 60) -> list[str]:
  """The lines of a compile failure after its first (for an HBM out-of-memory, XLA's list of the largest
  allocations: what to shrink), at most `max_lines`."""
  lines = [line.rstrip() for line in str(e).strip().splitlines()[1:] if line.strip()]
  return lines[:max_lines]
