"""A roofline estimate of one step on one chip from the compiled program's numbers.

  compute  = FLOPs per chip / peak bf16 FLOP/s
  hbm      = bytes accessed per chip / HBM bandwidth
  ici[axis]= wire bytes over that mesh axis / the axis's ICI bandwidth
  dcn      = wire bytes over groups that cross slices / DCN bandwidth per chip

The estimate is the largest of them (perfect overlap: optimistic); `serial_s` is their sum (no overlap:
pessimistic). The axis bandwidth assumes a bidirectional ring on each torus dimension the axis spans
(per-port bidirectional bandwidth x dimensions spanned): optimistic for axes that do not map onto whole
torus rings. Peak FLOP/s is never reached by real kernels, so MFU here is an upper bound.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np


@dataclasses.dataclass
class Roofline:
  compute_s: float
  hbm_s: float
  ici_s: dict[str, float]
  dcn_s: float
  step_s: float
  serial_s: float
  bound: str
  mfu: float
  tokens_per_s_per_chip: float

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def roofline(*, flops_per_chip: float, model_flops_per_chip: float, hbm_bytes_per_chip: float,
             ici_bytes_by_axis: dict[str, float], dcn_bytes: float, tokens_per_step: float, num_chips: int,
             peak_flops: float, hbm_bw: float, ici_bw_by_axis: dict[str, float],
             dcn_bw: float | None) -> Roofline:
  """All inputs per chip and per step, bandwidths in bytes/s. `flops_per_chip` is what runs (remat
  included), `model_flops_per_chip` what MFU counts."""
  terms = {"compute": flops_per_chip / peak_flops, "hbm": hbm_bytes_per_chip / hbm_bw}
  ici = {}
  for axis, b in ici_bytes_by_axis.items():
    bw = ici_bw_by_axis.get(axis)
    if b and not bw:
      raise ValueError(f"no ICI bandwidth for mesh axis {axis!r}")
    ici[axis] = b / bw if b else 0.0
  for axis, t in ici.items():
    terms[f"ici:{axis}"] = t
  dcn = dcn_bytes / dcn_bw if (dcn_bytes and dcn_bw) else 0.0
  terms["dcn"] = dcn
  bound = max(terms, key=terms.get)
  step = terms[bound]
  return Roofline(compute_s=terms["compute"], hbm_s=terms["hbm"], ici_s=ici, dcn_s=dcn, step_s=step,
                  serial_s=float(sum(terms.values())), bound=bound,
                  mfu=model_flops_per_chip / (step * peak_flops) if step else 0.0,
                  tokens_per_s_per_chip=tokens_per_step / num_chips / step if step else 0.0)


def axis_ici_bandwidth(mesh, chip) -> dict[str, float]:
  """Per mesh axis: per-port bidirectional ICI bandwidth x the torus dimensions the axis spans (>= 1).
  Keys are single axes and the '+'-joined pairs/triples the collectives report."""
  per_port = chip.ici_bw / chip.ici_ports
  names = list(mesh.axis_names)
  devs = mesh.devices
  spans = {}
  for a, name in enumerate(names):
    if devs.shape[a] == 1:
      spans[name] = set()
      continue
    moved = np.moveaxis(devs, a, 0).reshape(devs.shape[a], -1)
    dims = set()
    for col in moved.T:
      coords = np.array([tuple(getattr(d, "coords", (0, 0, 0))) + (getattr(d, "slice_index", 0) or 0,)
                         for d in col])
      dims.update(int(i) for i in range(coords.shape[1] - 1) if len(set(coords[:, i].tolist())) > 1)
    spans[name] = dims
  out = {}
  for r in range(1, len(names) + 1):
    for combo in itertools.combinations(names, r):
      dims = set().union(*(spans[n] for n in combo))
      out["+".join(combo)] = per_port * max(len(dims), 1)
  return out
