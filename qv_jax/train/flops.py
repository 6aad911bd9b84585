"""Matmul FLOPs of a traced function, counted on its jaxpr with loop trip counts.

XLA's cost analysis counts a while-loop body once, so a step built from `lax.scan` (scanned layers,
frame chunks, logits chunks, gradient accumulation) is undercounted. Here every `dot_general` and
convolution is counted as 2·M·N·K (batch dims included) and multiplied by the trip counts of the scans
around it; remat recomputation in the backward pass is counted because it is in the jaxpr. A
`shard_map` body (per-chip shapes) counts once per chip it runs on, so the total is over all chips as
for GSPMD code. Elementwise work is ignored (it is a few percent at any real size).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax


def _dot_flops(eqn) -> float:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  contract = math.prod(lhs.shape[d] for d in lc)
  batch = math.prod(lhs.shape[d] for d in lb)
  m = math.prod(s for i, s in enumerate(lhs.shape) if i not in lc and i not in lb)
  n = math.prod(s for i, s in enumerate(rhs.shape) if i not in rc and i not in rb)
  return 2.0 * batch * m * n * contract


def _conv_flops(eqn) -> float:
  out = eqn.outvars[0].aval
  rhs = eqn.invars[1].aval
  dn = eqn.params["dimension_numbers"]
  spec = dn.rhs_spec if hasattr(dn, "rhs_spec") else (0, 1, 2, 3)
  out_features = rhs.shape[spec[0]]
  kernel_elems = math.prod(rhs.shape) / max(out_features, 1)
  return 2.0 * math.prod(out.shape) * kernel_elems


def _sub_jaxprs(params: dict) -> list:
  found = []
  for value in params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if hasattr(v, "jaxpr") and hasattr(v, "consts"):       # ClosedJaxpr
        found.append(v.jaxpr)
      elif hasattr(v, "eqns"):                                # Jaxpr
        found.append(v)
  return found


def jaxpr_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    elif name == "cond":
      total += max((jaxpr_flops(b.jaxpr) for b in eqn.params["branches"]), default=0.0)
    elif name == "shard_map":                 # the body sees per-device shapes: count every device
      mesh = eqn.params["mesh"]
      devices = math.prod(mesh.shape[a] for a in eqn.params.get("newly_manual_axes", mesh.axis_names))
      total += devices * sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn.params))
    else:
      total += sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn.params))
  return total


def matmul_flops(fn: Callable, *args: Any) -> float:
  """FLOPs of the matmuls and convolutions of one call of `fn(*args)` (args may be abstract)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
