"""One long video on 8 chips: the whole-model step (forward + backward) with context = 8 vs one device.

  python benchmarks/context.py                    # tiny model, F = 64 bucket, 60 valid frames, batch 1

Runs on 8 simulated host CPU devices (set below before JAX starts). Prints one JSON line per mesh with
compile / run seconds and XLA's FLOPs per device and in total (per device × devices), and a summary
line with the sharded / unsharded total-FLOPs ratio (the issue's bound: ≤ 1.15). Loops are made single
trip (one vision chunk, one resampler chunk per chip, one attention / CE chunk) because XLA counts a
loop body once. Times on a shared CPU host are only comparable within one run.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("PJRT_NPROC", "256")           # XLA:CPU collectives need a large pool (docs/context.md)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402

from benchmarks.common import device_info, emit, flops, memory  # noqa: E402
from context_util import long_video_batch, long_video_config, make_model, sharded_step  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[1].strip())
  parser.add_argument("--quick", action="store_true", help="accepted for symmetry: the run is already tiny")
  parser.parse_args()
  jax.config.update("jax_threefry_partitionable", True)
  c = long_video_config()
  c.model.vision.frame_chunk = 64
  c.model.compressor.token_chunk = 64 * 36
  c.model.decoder.attention_chunk = c.data.max_seq_len
  model = make_model(c)
  batch = long_video_batch(c, 60)
  totals = {}
  for name, sizes, devices in (("unsharded", {}, jax.devices()[:1]), ("context=8", dict(context=8), None)):
    (loss, _, _), compiled, timing = sharded_step(c, model, batch, sizes, devices,
                                                  ce_chunk=c.data.max_seq_len)
    n = len(devices or jax.devices())
    per_device = flops(compiled)
    totals[name] = per_device * n if per_device is not None else None
    emit(dict(mesh=name, devices=n, loss=float(loss), flops_per_device=per_device, flops_total=totals[name],
              peak_bytes_per_device=memory(compiled).get("peak_bytes"), **timing, **device_info()))
  ratio = None if None in totals.values() else totals["context=8"] / totals["unsharded"]
  emit(dict(summary="context=8 vs unsharded", flops_total_ratio=ratio, bound=1.15))


if __name__ == "__main__":
  main()
