"""Decoder attention over the `context` axis: GSPMD's all-gathered K/V vs the zig-zag ring, per TPU chip.

  JAX_PLATFORMS=cpu python benchmarks/context_attention.py                  # v5p and v5e, context 8 and 16
  python benchmarks/context_attention.py --chips v5p --contexts 8 --lengths 6144 --markdown

One Qwen2.5-7B-shaped attention layer (q/k/v/o projections with bias, RoPE, 28 query / 4 KV heads of 128,
bf16 compute, fp32 params), forward + backward (input and weight gradients) under the decoder's remat
policy, batch 1, the sequence split over `context` (mesh 1 x 1 x C x 1), compiled ahead of time for a TPU
topology of C chips on this host (libtpu's compile-only devices, `qv_jax/plan/`). Per chip: XLA's memory
analysis, matmul FLOPs (jaxpr count), collective bytes by kind and the planner's roofline time. The ring
layer takes its input already in the zig-zag layout, as the decoder arranges once for all its layers; the
one-off relayout (in and out, forward and backward) is reported on its own row. Prints one JSON line per
row; --markdown adds the table of docs/context.md.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from qv_jax.config.mesh import LOGICAL_AXIS_RULES  # noqa: E402
from qv_jax.config.typed import decoder_config  # noqa: E402
from qv_jax.layers.stack import checkpoint_policy  # noqa: E402
from qv_jax.model.attention import Attention  # noqa: E402
from qv_jax.model.rope import inv_frequencies, rope_tables  # noqa: E402
from qv_jax.parallel.ring_attention import from_zigzag, to_zigzag  # noqa: E402
from qv_jax.plan.target import load_target, target_mesh  # noqa: E402
from qv_jax.plan.train_plan import analyse  # noqa: E402
from qv_jax.sharding import HIDDEN_AXES, axis_rules, constrain  # noqa: E402
from qv_jax.train.flops import matmul_flops  # noqa: E402

GRIDS = {"v5p": {8: "2x2x2", 16: "2x2x4"}, "v5e": {8: "2x4", 16: "4x4"}, "v6e": {8: "2x4", 16: "4x4"}}
SEQ = HIDDEN_AXES


def layer_step(mode: str, length: int):
  """(step(params, x, dy) -> (d params, dx), abstract params) for one attention layer."""
  cfg = decoder_config("qwen2_7b", dtype="bfloat16", context_attention=mode)
  abstract = nnx.eval_shape(lambda: Attention(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract)
  policy = checkpoint_policy(cfg.remat_policy)

  def loss(params, x, dy):
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    cos, sin = rope_tables(positions, inv_frequencies(cfg.head_dim, cfg.rope_theta), jnp.bfloat16)
    out, _ = nnx.merge(graphdef, params)(constrain(x, SEQ), cos, sin, jnp.ones((1, length), bool),
                                         zigzag=mode == "ring")
    return (out.astype(jnp.float32) * dy.astype(jnp.float32)).sum()

  def step(params, x, dy):
    return jax.grad(jax.checkpoint(loss, policy=policy), argnums=(0, 1))(params, x, dy)

  return step, params


def relayout_step(length: int):
  """The ring's one-off zig-zag permutation of the decoder input and back, with its backward."""
  def loss(x, dy):
    return (from_zigzag(to_zigzag(x, SEQ), SEQ).astype(jnp.float32) * dy.astype(jnp.float32)).sum()
  return jax.grad(loss), None


def measure(chip: str, context: int, length: int, mode: str) -> dict:
  topology = f"{chip}:{GRIDS[chip][context]}"
  target = load_target(topology)
  mesh = target_mesh(target, (1, 1, context, 1))
  hidden = decoder_config("qwen2_7b").hidden_size
  seq = jax.ShapeDtypeStruct((1, length, hidden), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(None, "context", None)))
  step, params = relayout_step(length) if mode == "relayout" else layer_step(mode, length)
  args = (seq, seq)
  if params is not None:
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())),
                          params)
    args = (params,) + args
  with jax.set_mesh(mesh), axis_rules(LOGICAL_AXIS_RULES):
    compiled = jax.jit(step).lower(*args).compile()
    total_flops = matmul_flops(step, *args)
  report = analyse(compiled, mesh, target, flops=total_flops, tokens=float(length))
  colls = report["collectives_per_chip"]
  return dict(topology=topology, context=context, tokens=length, attention=mode,
              memory_bytes=report["memory_per_chip"]["total_bytes"],
              temp_bytes=report["memory_per_chip"]["temp_bytes"],
              flops=report["flops_per_chip"]["jaxpr_matmul"],
              collective_bytes={k: v for k, v in colls["wire_bytes_by_kind"].items() if v},
              collective_ops={k: v for k, v in colls["executions_by_kind"].items() if v},
              roofline_s=report["roofline"]["step_s"], bound=report["roofline"]["bound"],
              compute_s=report["roofline"]["compute_s"], hbm_s=report["roofline"]["hbm_s"],
              ici_s=sum(report["roofline"]["ici_s"].values()))


def markdown(rows: list[dict]) -> str:
  def mib(b):
    return f"{b / 2 ** 20:.0f}"

  def kinds(d):
    short = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
             "collective-permute": "CP"}
    return ", ".join(f"{short[k]} {mib(v)}" for k, v in sorted(d.items())) or "-"

  lines = ["| chips | tokens | attention | memory MiB | TFLOP | collectives MiB (sent) | roofline ms | bound |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['topology']} (context {r['context']}) | {r['tokens']} | {r['attention']} | "
                 f"{mib(r['memory_bytes'])} | {r['flops'] / 1e12:.3f} | {kinds(r['collective_bytes'])} | "
                 f"{r['roofline_s'] * 1e3:.3f} | {r['bound']} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--chips", default="v5p,v5e", help="chip kinds (comma-separated): v5p, v5e, v6e")
  parser.add_argument("--contexts", default="8,16", help="context axis sizes (8, 16)")
  parser.add_argument("--lengths", default="6144,32768", help="sequence lengths (multiples of 2 x context)")
  parser.add_argument("--markdown", action="store_true", help="print the markdown table at the end")
  a = parser.parse_args()
  rows = []
  for chip in a.chips.split(","):
    for context in (int(c) for c in a.contexts.split(",")):
      for length in (int(n) for n in a.lengths.split(",")):
        for mode in ("allgather", "ring", "relayout"):
          row = measure(chip, context, length, mode)
          emit(row)
          rows.append(row)
        ag, ring = rows[-3], rows[-2]
        emit(dict(summary=f"{ag['topology']} context={context} tokens={length}",
                  ring_over_allgather_roofline=ring["roofline_s"] / ag["roofline_s"],
                  ring_over_allgather_flops=ring["flops"] / ag["flops"],
                  ring_over_allgather_memory=ring["memory_bytes"] / ag["memory_bytes"]))
  if a.markdown:
    print(markdown(rows))


if __name__ == "__main__":
  main()
