"""Step FLOPs of the released-size train step in the padded and the packed layouts, without a TPU compile:
the trainer's exact step traced for a topology's mesh and counted on its jaxpr (qv_jax/train/flops.py, scan
trip counts and remat included). Cheap (a trace, ~10-60 s each), so it answers "how much of the step is
padding" before the compiles that give memory and collectives (`launch.plan`).

  python benchmarks/plan_flops.py                              # #15: v5p:4x4x4, batch 64, stage 3
  python benchmarks/plan_flops.py --size qwen2_7b --topology v5p:4x4x4 --mesh 1,64,1 \
      --layouts pad:64:420:16384,pack1:64:420:7168,pack4:64:5:2048

A layout is name:rows:frames:seq_len; name `pad` is the original layout (seq_len = data.max_seq_len), `packP`
the packed layout with P samples per row. Prints one JSON line per layout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from common import emit  # noqa: E402
from launch.plan import load_config  # noqa: E402
from qv_jax.plan.target import load_target, target_mesh  # noqa: E402
from qv_jax.plan.train_plan import apply_overrides  # noqa: E402
from qv_jax.sharding import axis_rules  # noqa: E402
from qv_jax.train.compile import abstract_batch  # noqa: E402
from qv_jax.train.flops import matmul_flops  # noqa: E402
from qv_jax.train.state import train_state_spec  # noqa: E402
from qv_jax.train.step import make_train_step  # noqa: E402

DEFAULT = "pad:64:420:16384,pack1:64:420:7168,pack1:64:420:6144,pack4:64:5:2048"


def count(size: str, topology: str, mesh_shape, name: str, rows: int, frames: int, seq_len: int) -> dict:
  config = load_config(f"configs/quicksviewer.py:size={size},stage=3")
  pack = None if name == "pad" else int(name[len("pack"):])
  config = apply_overrides(config, batch=rows, frames=frames, pack=pack, seq_len=seq_len)
  target = load_target(topology)
  mesh = target_mesh(target, mesh_shape)
  config = apply_overrides(config, mesh_shape=tuple(mesh.shape.values()))
  t0 = time.perf_counter()
  abstract, spec = train_state_spec(config, mesh, config.sharding_rules)
  batch = abstract_batch(config, mesh)
  step_fn = make_train_step(spec.graphdef, config, spec.tx)
  with jax.set_mesh(mesh), axis_rules(config.sharding_rules):
    flops = matmul_flops(step_fn, abstract, batch)
  slots = rows * (pack or 1)
  return dict(layout=name, size=size, topology=topology, mesh=list(mesh_shape), rows=rows, samples=slots,
              frames=frames, seq_len=seq_len, decoder_positions=rows * seq_len, step_flops=flops,
              flops_per_sample=flops / slots, trace_and_count_s=time.perf_counter() - t0)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", default="qwen2_7b")
  p.add_argument("--topology", default="v5p:4x4x4")
  p.add_argument("--mesh", default="1,64,1")
  p.add_argument("--layouts", default=DEFAULT)
  args = p.parse_args(argv)
  mesh = tuple(int(x) for x in args.mesh.split(","))
  for spec in args.layouts.split(","):
    name, rows, frames, seq = spec.split(":")
    emit(count(args.size, args.topology, mesh, name, int(rows), int(frames), int(seq)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
