"""Per-chip figures of the TPU kinds the planner knows, each with its public source.

Bandwidths are bytes/s; ICI is the chip's total bidirectional bandwidth over all its ports; DCN is per chip
(None where the source publishes none: DCN time is then not estimated).
"""

from __future__ import annotations

import dataclasses

GB = 1e9
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str               # the topology prefix: v5e, v5p, v6e
  device_kind: str        # jax's device.device_kind for it
  hbm_bytes: float
  peak_bf16_flops: float
  hbm_bw: float
  ici_bw: float           # bidirectional, all ports together
  ici_ports: int
  dcn_bw: float | None    # per chip
  chips_per_host: int     # of a multi-host slice (single-host slices of <= 8 v5e/v6e chips are one host)
  source: str


CHIPS = {
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GIB, 197e12, 819 * GB, 400 * GB, 4, 2 * 100e9 / 8 / 4, 4,
                "https://cloud.google.com/tpu/docs/v5e (197 TFLOPs bf16, 16 GB HBM2 at 819 GBps, ICI 400 GBps "
                "bidirectional per chip over 4 ports, 2 x 100 Gbps NIC per host)"),
    "v5p": Chip("v5p", "TPU v5", 95 * GIB, 459e12, 2765 * GB, 1200 * GB, 6, 50e9 / 8, 4,
                "https://cloud.google.com/tpu/docs/v5p (459 TFLOPs bf16, 95 GiB HBM2e at 2765 GBps, ICI "
                "1200 GBps bidirectional per chip, 3D torus, DCN 50 Gbps per chip)"),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GIB, 918e12, 1638 * GB, 800 * GB, 4, None, 4,
                "https://cloud.google.com/tpu/docs/v6e (918 TFLOPs bf16, 32 GB HBM at 1638 GBps, ICI 800 GBps "
                "bidirectional per chip over 4 ports; no DCN figure published there)"),
}

