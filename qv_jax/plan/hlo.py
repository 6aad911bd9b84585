"""Collective traffic, and HBM traffic per loop, read from a compiled program's optimized HLO text.

Every all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute (sync or async `-start`) is
found in every computation, multiplied by how often its computation runs (a while body by its trip count,
nested loops multiplied) and attributed to the mesh axes its replica groups span. Per chip:

  payload  = the bytes of the op's operands (per participant)
  wire     = what one chip sends in a ring/bidirectional implementation over a group of n:
             all-gather (n-1)·payload, reduce-scatter and all-to-all (n-1)/n·payload,
             all-reduce 2(n-1)/n·payload, collective-permute payload.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Iterable, Sequence

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
               "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}

_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_COND = re.compile(r"\bcondition=%?([\w.\-]+)")


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape string, tuples summed: 'f32[4,4]{1,0}' -> 64."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in DTYPE_BYTES:
      continue
    total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  op: str
  rest: str                  # operands and attributes


@dataclasses.dataclass
class Collective:
  kind: str
  name: str
  computation: str
  count: int                 # executions per step (loop trip counts multiplied)
  group_size: int
  groups: list[list[int]]
  payload_bytes: float       # per participant, per execution
  wire_bytes: float          # sent per chip, per execution
  axes: tuple[str, ...] = ()

  @property
  def total_wire(self) -> float:
    return self.count * self.wire_bytes


def parse_computations(text: str) -> tuple[dict[str, list[Instr]], str | None]:
  """-> ({computation name: instructions}, the entry's name)."""
  comps: dict[str, list[Instr]] = {}
  entry = None
  current = None
  for line in text.splitlines():
    if current is None:
      m = _COMP_HEAD.match(line.strip())
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      comps[current].append(Instr(m.group(1), m.group(2), m.group(3), m.group(4)))
  return comps, entry


def _operand_names(rest: str) -> list[str]:
  depth, out = 0, []
  for i, ch in enumerate(rest):
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      if depth == 0:
        out = rest[:i]
        break
      depth -= 1
  else:
    out = rest
  return re.findall(r"%([\w.\-]+)", out)


def _trip_count(instr: Instr, comps: dict) -> int:
  m = _TRIP.search(instr.rest)
  if m:
    return int(m.group(1))
  cond = _COND.search(instr.rest)
  consts = []
  for ins in comps.get(cond.group(1), []) if cond else []:
    c = re.match(r"\s*(-?\d+)\)", ins.rest)
    if ins.op == "constant" and c:
      consts.append(int(c.group(1)))
  return max(consts) if consts else 1


def execution_counts(comps: dict[str, list[Instr]], entry: str) -> dict[str, int]:
  """How many times each computation runs per call of the entry (while bodies x trip counts)."""
  counts: dict[str, int] = collections.defaultdict(int)

  def visit(name: str, times: int, depth: int = 0):
    if name not in comps or depth > 64:
      return
    counts[name] += times
    for ins in comps[name]:
      called = _CALLED.findall(ins.rest)
      branches = _BRANCHES.search(ins.rest)
      if branches:
        called += re.findall(r"%?([\w.\-]+)", branches.group(1))
      mult = _trip_count(ins, comps) if ins.op == "while" else 1
      for c in called:
        if ins.op in ("reduce", "all-reduce", "all-reduce-start", "reduce-scatter", "scatter", "sort",
                      "reduce-window", "select-and-scatter", "map") and f"to_apply=%{c}" in ins.rest:
          continue             # reducers run per element, never hold collectives
        visit(c, times * mult, depth + 1)
  visit(entry, 1)
  return dict(counts)


def _replica_groups(rest: str, num_devices: int) -> list[list[int]]:
  m = re.search(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}", rest)
  if m:
    groups = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
    return groups or [list(range(num_devices))]              # replica_groups={}: one group of all
  m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest)
  if m:
    out_shape = [int(x) for x in m.group(1).split(",")]
    ids = np.arange(math.prod(int(x) for x in m.group(2).split(","))).reshape(
        [int(x) for x in m.group(2).split(",")])
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape(out_shape).tolist()
  m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", rest)
  if m:
    return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
  return [list(range(num_devices))]


def wire_bytes(kind: str, payload: float, n: int) -> float:
  """Bytes one chip sends for one execution of a collective over a group of `n` (see the module doc)."""
  if n <= 1:
    return 0.0
  return {"all-gather": (n - 1) * payload, "reduce-scatter": (n - 1) / n * payload,
          "all-to-all": (n - 1) / n * payload, "all-reduce": 2 * (n - 1) / n * payload,
          "collective-permute": payload}[kind]


def mesh_axes_of(groups: Sequence[Sequence[int]], mesh_shape: Sequence[int], axis_names: Sequence[str],
                 device_order: Sequence[int] | None = None) -> tuple[str, ...]:
  """The mesh axes along which the members of the groups differ. Ids index the mesh's flattened device
  order (SPMD partition ids); `device_order` maps them when the program's assignment differs."""
  varying = set()
  for g in groups:
    coords = np.array([np.unravel_index(device_order[i] if device_order is not None else i, mesh_shape)
                       for i in g])
    for a, name in enumerate(axis_names):
      if len(set(coords[:, a].tolist())) > 1:
        varying.add(name)
  return tuple(n for n in axis_names if n in varying)


def collectives(text: str, mesh_shape: Sequence[int] = (), axis_names: Sequence[str] = ()) -> list[Collective]:
  """All collectives of the optimized HLO `text` with their per-step counts and bytes."""
  comps, entry = parse_computations(text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  counts = execution_counts(comps, entry)
  n_dev = math.prod(mesh_shape) if mesh_shape else 1
  out = []
  for cname, instrs in comps.items():
    if cname not in counts:
      continue
    shapes = {i.name: i.shape for i in instrs}
    for ins in instrs:
      kind = ins.op[:-len("-start")] if ins.op.endswith("-start") else ins.op
      if kind not in KINDS:
        continue
      payload = sum(shape_bytes(shapes.get(o, "")) for o in _operand_names(ins.rest))
      groups = _replica_groups(ins.rest, n_dev)
      n = 2 if kind == "collective-permute" else max((len(g) for g in groups), default=1)
      axes = mesh_axes_of(groups, mesh_shape, axis_names) if mesh_shape else ()
      out.append(Collective(kind=kind, name=ins.name, computation=cname, count=counts[cname], group_size=n,
                            groups=groups, payload_bytes=payload, wire_bytes=wire_bytes(kind, payload, n),
                            axes=axes))
  return out


def summarize(colls: Iterable[Collective]) -> dict:
  """Per-chip bytes per step by kind and by mesh axes ('data+fsdp' for a group spanning both)."""
  by_kind: dict[str, float] = {k: 0.0 for k in KINDS}
  by_axis: dict[str, float] = collections.defaultdict(float)
  ops = collections.Counter()
  for c in colls:
    by_kind[c.kind] += c.total_wire
    by_axis["+".join(c.axes) or "none"] += c.total_wire
    ops[c.kind] += c.count
  return {"wire_bytes_by_kind": by_kind, "wire_bytes_by_axis": dict(by_axis), "executions_by_kind": dict(ops),
          "wire_bytes_total": sum(by_kind.values())}



_FREE = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "opt-barrier"}
_SLICERS = {"dynamic-slice", "slice", "gather"}


def _control_computations(comps: dict[str, list[Instr]], entry: str) -> set[str]:
  """The entry and what it runs as control flow (while bodies, branches, calls): the computations whose
  instructions touch HBM. Loop conditions (a scalar compare), fusion bodies, reducers and async wrappers are
  not among them."""
  out, todo = set(), [entry]
  while todo:
    name = todo.pop()
    if name in out or name not in comps:
      continue
    out.add(name)
    for ins in comps[name]:
      if ins.op == "while":
        todo += re.findall(r"\bbody=%?([\w.\-]+)", ins.rest)
      elif ins.op == "conditional":
        branches = _BRANCHES.search(ins.rest)
        todo += re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else []
        todo += re.findall(r"\b(?:true_computation|false_computation)=%?([\w.\-]+)", ins.rest)
      elif ins.op == "call":
        todo += re.findall(r"\bto_apply=%?([\w.\-]+)", ins.rest)
  return out


def _fusion_bytes(ins: Instr, operand_bytes: list[float], fused: list[Instr]) -> float:
  """Bytes a fusion reads and writes: each operand whole, or only the slices taken of it when every use in
  the fused body slices it; the result whole, or only the update of an in-place dynamic-update-slice root."""
  params = {}
  for i in fused:
    if i.op == "parameter":
      m = re.match(r"\s*(\d+)", i.rest)
      if m:
        params[i.name] = int(m.group(1))
  users: dict[str, list[Instr]] = collections.defaultdict(list)
  for i in fused:
    for o in _operand_names(i.rest):
      if o in params:
        users[o].append(i)
  by_name = {i.name: i for i in fused}
  root = fused[-1] if fused else None
  roots = ([by_name.get(o) for o in _operand_names(root.rest)] if root is not None and root.op == "tuple"
           else [root])
  written, in_place = 0.0, set()
  for r in roots:
    if r is None:
      continue
    if r.op == "dynamic-update-slice":
      ops = _operand_names(r.rest)
      written += shape_bytes(by_name[ops[1]].shape) if len(ops) > 1 and ops[1] in by_name else 0.0
      in_place.update(o for o in ops[:1] if o in params)
    else:
      written += shape_bytes(r.shape)
  read = 0.0
  for name, idx in params.items():
    if name in in_place:
      continue
    uses = users.get(name, [])
    if uses and all(u.op in _SLICERS and _operand_names(u.rest)[:1] == [name] for u in uses):
      read += sum(shape_bytes(u.shape) for u in uses)
    elif idx < len(operand_bytes):
      read += operand_bytes[idx]
  return read + written


def hbm_traffic(text: str) -> tuple[float, float]:
  """(bytes per step with loop bodies times their trip counts, bytes with every op once) read and written by
  the top-level ops of the optimized HLO `text`, by the per-op model of XLA's cost analysis: an op reads its
  operands and writes its result; a fusion as in `_fusion_bytes`; (dynamic-)slices move their result, an
  in-place dynamic-update-slice its update; tuples, bitcasts, parameters and async `-done` halves are free.
  Their ratio scales XLA's bytes accessed, which counts each loop body once, by where the bytes are."""
  comps, entry = parse_computations(text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  counts = execution_counts(comps, entry)
  weighted = once = 0.0
  for cname in _control_computations(comps, entry):
    instrs = comps[cname]
    shapes = {i.name: i.shape for i in instrs}
    for ins in instrs:
      if ins.op in _FREE or ins.op.endswith("-done"):
        continue
      operands = [shape_bytes(shapes.get(o, "")) for o in _operand_names(ins.rest)]
      if ins.op == "fusion":
        called = re.search(r"\bcalls=%?([\w.\-]+)", ins.rest)
        b = _fusion_bytes(ins, operands, comps.get(called.group(1), []) if called else [])
      elif ins.op == "dynamic-update-slice":
        b = 2 * (operands[1] if len(operands) > 1 else 0.0)
      elif ins.op in ("dynamic-slice", "slice"):
        b = 2 * shape_bytes(ins.shape)
      else:
        b = shape_bytes(ins.shape) + sum(operands)
      weighted += b * counts.get(cname, 1)
      once += b
  return weighted, once
