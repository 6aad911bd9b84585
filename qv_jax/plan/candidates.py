"""Candidate (data, fsdp, context, tensor) meshes (context = 1) for a chip count and a global batch."""

from __future__ import annotations


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def mesh_candidates(chips: int, batch: int, *, num_slices: int = 1, grad_accum: int = 1,
                    max_tensor: int = 8, heads: int | None = None,
                    inference: bool = False) -> list[tuple[int, int, int, int]]:
  """Meshes whose batch shards (data x fsdp) divide the global batch and the micro-batch, whose data axis
  is a multiple of the slice count, and whose tensor axis (<= max_tensor, within a host's reach) divides
  the attention heads. Ordered fsdp-heaviest first (the usual best for a 7B model). `inference`: a batch
  too small to split only shards the params (no batch or head condition, no data axis)."""
  out = []
  micro = batch // max(grad_accum, 1)
  for tensor in _divisors(chips):
    if tensor > max_tensor or (heads and heads % tensor and not inference):
      continue
    rest = chips // tensor
    for data in _divisors(rest):
      fsdp = rest // data
      shards = data * fsdp
      if inference and data > 1:
        continue
      if not inference and (data % num_slices or batch % shards or micro % shards):
        continue
      out.append((data, fsdp, 1, tensor))
  return sorted(out, key=lambda m: (m[3], m[0]))
