"""Train-step throughput: step time, tokens/s and achieved TFLOP/s per device of the full jitted step
(vision tower → cubing → resampler → assembly → decoder → loss → AdamW update) on synthetic batches.

  python benchmarks/train_step.py --quick                        # tiny only, a few steps
  python benchmarks/train_step.py --sizes tiny,small --stage 3 --steps 10
  python benchmarks/train_step.py --sizes qwen2_7b --batch 8 --frames 420 --mesh 1,-1,1   # on a TPU slice

Prints one JSON line per size: seconds per step (median, min), merged decoder tokens per step and per second,
matmul FLOPs per step (counted on the jaxpr with scan trip counts) and XLA's cost-analysis FLOPs (which count
each loop body once), achieved TFLOP/s per device for both, the measured fp32 matmul peak and the fraction of
it reached, compile seconds and count, and the compiled step's memory analysis.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import CompileCounter, device_info, emit, flops, matmul_peak, memory, time_call  # noqa: E402
from qv_jax.config import get_config, validate  # noqa: E402
from qv_jax.sharding import axis_rules, make_mesh  # noqa: E402
from qv_jax.train.flops import matmul_flops  # noqa: E402
from qv_jax.train.loop import to_global  # noqa: E402
from qv_jax.train.state import create_train_state  # noqa: E402
from qv_jax.train.compile import compile_train_step  # noqa: E402
from qv_jax.train.step import make_train_step  # noqa: E402
from qv_jax.train.synthetic_batches import SyntheticBatches  # noqa: E402


def bench(size: str, *, stage: int, batch: int | None, frames: int | None, steps: int, mesh_sizes,
          text_len: int | None, seq_len: int | None, peak: float) -> dict:
  c = get_config(f"size={size},stage={stage}")
  if batch:
    c.data.batch_size = batch
  if frames:
    c.data.max_frames = frames
    c.data.frame_buckets = (frames,)
  if text_len:
    c.data.max_text_len = text_len
  if seq_len:
    c.data.max_seq_len = seq_len
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_sizes
  c = validate(c)
  mesh = make_mesh(c.mesh)
  data = SyntheticBatches(c, seed=0)
  with jax.set_mesh(mesh), axis_rules(c.sharding_rules):
    t0 = time.perf_counter()
    state, spec = create_train_state(c, mesh)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    batches = [to_global(next(data), mesh) for _ in range(2)]   # compile on one, time on the other
    step = make_train_step(spec.graphdef, c, spec.tx)
    with CompileCounter() as compiles:
      t0 = time.perf_counter()
      compiled = compile_train_step(step, spec, state, batches[0])
      compile_s = time.perf_counter() - t0
    counted = matmul_flops(step, state, batches[0])
    xla = flops(compiled)
    box = {"state": state}
    tokens = []

    def run(b):
      box["state"], m = compiled(box["state"], b)
      tokens.append(m["merged_tokens"])
      return m["loss"]

    timing = time_call(run, batches[1], warmup=1, repeats=steps)
    merged = float(np.mean([float(t) for t in tokens]))
  n_dev = jax.device_count()
  sec = timing["median_s"]
  per_dev = counted / n_dev / sec
  return {
      "benchmark": "train_step", "size": size, "stage": stage, "batch": c.data.batch_size,
      "frames": int(c.data.frame_buckets[-1]), "max_text_len": c.data.max_text_len,
      "max_seq_len": c.data.max_seq_len, "mesh": dict(mesh.shape), "devices": n_dev,
      "compute_dtype": c.model.compute_dtype, "step_s_median": sec, "step_s_min": timing["min_s"],
      "steps_timed": steps, "init_s": init_s, "compile_s": compile_s, "compile_count": compiles.count,
      "merged_tokens_per_step": merged, "tokens_per_s": merged / sec,
      "matmul_flops_per_step": counted, "xla_flops_per_step_per_device": xla,
      "tflops_per_device": per_dev / 1e12,
      "xla_tflops_per_device": None if xla is None else xla / sec / 1e12,
      "matmul_peak_tflops": peak / 1e12, "fraction_of_peak": per_dev / peak,
      "memory": memory(compiled), **device_info(),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="tiny,small")
  p.add_argument("--stage", type=int, default=3, help="3 trains everything (the most work per step)")
  p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
  p.add_argument("--frames", type=int, default=None, help="frame bucket (default: the config's)")
  p.add_argument("--text-len", type=int, default=None)
  p.add_argument("--seq-len", type=int, default=None)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes")
  p.add_argument("--quick", action="store_true", help="tiny only, 3 timed steps, short sequences")
  args = p.parse_args(argv)
  sizes = ["tiny"] if args.quick else [s for s in args.sizes.split(",") if s]
  steps = 3 if args.quick else args.steps
  mesh_sizes = tuple(int(x) for x in args.mesh.split(","))
  peak = matmul_peak(1024 if args.quick else 4096)
  for size in sizes:
    small = size in ("tiny", "small")
    emit(bench(size, stage=args.stage, batch=args.batch, frames=args.frames, steps=steps, mesh_sizes=mesh_sizes,
               text_len=args.text_len or (128 if small else None), seq_len=args.seq_len or (128 if small else None),
               peak=peak))
  return 0


if __name__ == "__main__":
  sys.exit(main())
