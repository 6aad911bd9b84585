"""Renders docs/scaling.md and docs/scaling.png from the stored rows of `launch.plan_study`."""

from __future__ import annotations

import json
import math
import os

from qv_jax.plan import report
from qv_jax.plan.target import display_name, parse_topology

GIB = 2 ** 30

INTRO = """# Scaling study: the stage-3 train step of the released sizes on TPU slices

Regenerate with `python -m launch.plan_study` (compiles the rows still missing, then rewrites this file and
`scaling.png`); `--render` only rewrites them. Every number below comes from `python -m launch.plan`
(docs/planner.md): XLA's TPU compiler (libtpu 0.0.42.1) compiled the exact train step for the topology on a
CPU host, and a roofline turned its FLOPs, bytes and collectives into a step time. **These are compiler
estimates, not measurements.** The memory per chip is the compiler's own buffer assignment (the most
trustworthy figure); the step time assumes peak FLOP/s, perfect overlap of compute and communication and
full-ring ICI bandwidth, so it is a lower bound and MFU an upper bound (real kernels reach perhaps
50-70 % of peak). Where the HBM term is the bound, it is XLA's bytes-accessed count scaled up by the
jaxpr/XLA FLOP ratio (XLA counts a loop body once): a rough figure, not a traffic model. Every step below
uses that FLOP-scaled term, so that all rows compare; rows compiled since 2026-12-02 also show the planner's
newer HBM term, which weights each HLO op by its loops' trip counts (`HBM loop-weighted`, docs/planner.md).

Setup: stage 3 (everything trains), 420 frames per video, AdamW in fp32 params with bf16 compute, vision remat
on, frame_chunk 16. Targets are libtpu topologies named by their chip grid (`v5p:4x4x8` = 128 chips), with
the Cloud TPU accelerator type to order in brackets: v5p types count TensorCores, two per chip (`v5p-256`),
v5e (`v5litepod-N`) and v6e types count chips. The weak and strong rows put one
video per decoder row in its 7168-position sequence bucket (`--pack 1 --seq-len 7168`, the layout
docs/packing.md recommends; the `padded` row shows the old `max_seq_len` 16384). Weak scaling: a fixed number
of videos per chip for each chip kind, so the global batch grows with the chips: one per v5p chip (95 GiB),
half of one per v6e chip (32 GiB; a quarter on v6e-8, where neither fits), a quarter per v5e chip
(16 GiB), the rest of a video spread over `context` chips, or over `tensor` on the 8- and 16-chip slices,
where the optimizer state (about 102 GiB, sharded over fsdp x tensor but not context) would not fit otherwise. Strong scaling: global batch 64 on the slices that can
hold it. Each row compiles the one mesh its `mesh` column names (a feasibility and cost figure, not a mesh
search: `launch.plan --mesh auto` ranks candidates for one row); the inference rows compiled the first
`--mesh auto` candidate (fsdp only), and v5e-4 also a tensor-only mesh. `compile per mesh` is the wall time
of trace + compile on the host that ran it, a shared 2-core machine: rows computed before 2026-12-02 04:00 UTC
mostly ran two compiles at once (roughly twice a quiet host's time), later ones one at a time.
"""


READING = """## Reading the table (compiler estimates, as everywhere here)

- **Which slices can train stage 3 at 420 frames at all.** Every v5p slice, with a whole video per chip
  (qwen2_7b / llama3_8b 52.8 / 58.0 GiB on 8 chips, falling to 30.4 / 36.0 on 128: fsdp spreads the state).
  v6e from 64 chips, with half a video per chip (18.0 / 21.5 GiB on 64 chips, 15.6 / 17.5 on 256); v6e-8
  fits with neither half (34.9 GiB of 32) nor a quarter (33.9 / 36.0). v5e only at 256 chips, with a quarter
  video per chip (12.4 / 13.3 GiB of 16): on v5e-16 XLA runs out of HBM for its temporaries (17.96 / 18.55 G
  of 15.75 G) and on v5e-64 a quarter video per chip needs 17.0 / 16.9 GiB with context 4, and qwen2_7b 17.0
  with tensor 4. What holds the small slices back is the state: params and AdamW moments (about 102 GiB for
  qwen2_7b) shard over fsdp x tensor but not over context, and `tensor` does not split the 151673-token
  vocabulary (it divides by no power of two above 1), so qwen2_7b's embedding and LM head (2.0 GiB each in
  fp32, and their two AdamW moments) are split by fsdp only. Padding the vocabulary to a multiple of 128
  (Qwen2.5's own checkpoints pad to 152064 rows) and sharding the weights over context as well (MaxText's fsdp
  over the sequence axis) are the next changes to try; neither is built.
- **Cost of a video by chip kind** (`chip-s per sample`, the roofline step times the chips over the videos):
  about 4 chip-seconds on v5p:4x4x8 and v5p:8x8x8 (compute-bound: a v5p chip has room for a second video),
  7.5-8.7 on v5p:2x2x2 and v5p:2x4x4 (HBM-bound), 8.1-8.6 on v6e-64 and v6e-256 (HBM-bound) and 17-22 on
  v5e-256 (bound by the fsdp and context all-gathers). Per chip the roofline ranks v5p > v6e > v5e for this
  model, before prices.
- **Strong scaling, batch 64.** qwen2_7b: 16.4 s per step on v5p:2x4x4 (32 chips, two videos per chip,
  60.5 GiB), 2.33 s on v5p:4x4x8 (mesh 1,64,2,1: each video over 2 context chips, 16.7 GiB), 0.76 s on
  v5p:8x8x8 (1,64,4,2, 9.6 GiB) and 2.06 s on v6e:16x16 (1,64,4,1, 11.2 GiB); llama3_8b 16.6, 2.41, 0.74 and
  2.03 s. 4x the chips from 32 to 128 is 7x faster (the 32-chip step is HBM-bound with two videos per chip),
  4x again to 512 only 3.1x: chip-seconds per video 8.2, 4.7 and 6.1 (llama3_8b 8.3, 4.8, 6.0). For a batch of
  64 videos, 128 v5p chips with context 2 is the cheapest of these.
- **How far to trust the HBM term.** Where a row has both (compiled since 2026-12-02; three weak qwen2_7b rows
  were recompiled for this, with the same memory and FLOP-scaled figures as before), the loop-weighted HBM
  term (each HLO op times its loops' trip counts) is above the FLOP-scaled one every time: 10.3 against 7.5 s
  (v5p:2x2x2, batch 8), 6.27 against 3.92 s (v5p:8x8x8, batch 512: the step turns HBM-bound, above the 4.03 s
  compute term, so the 4 chip-seconds per video of the large v5p slices become about 6), 4.44 against 4.19 s
  (v6e:8x8), 1.06 against 0.76 s (v5p:8x8x8, batch 64), 2.82 against 2.41 s (llama3_8b, v5p:4x4x8, batch 64),
  4.90 against 4.06 s (llama3_8b, v6e:16x16, batch 128), and 20.4 against 5.6 s for qwen2_7b on v5e:8x8 with
  tensor 4, where `tensor` splits the FLOPs of the vision tower but not the bytes of its activations. So the
  HBM-bound step times of the table are optimistic by 1.1-1.6x, and by far more on tensor meshes; the compute
  and ICI terms and the memory per chip do not depend on it. On v5p:2x2x2, 82 % of the loop-weighted bytes are
  in loops that run at least 729 times per step: the vision tower's layers inside its frame chunks (27 x 27,
  with attention over 729 patches per frame materialized per head) and their collective matmuls.
- **Inference:** every Colab-sized runtime but v5e-1 serves one 420-frame question (v5e-1: 29 GiB of
  temporaries against 15.75 GiB); one v6e chip needs 26.4 of 32 GiB. With a batch of one, an fsdp mesh runs
  the whole prefill on every chip and only spreads the weights; on v5e-4 a tensor mesh (1,1,1,4) takes
  2.45 s against 4.01 s for fsdp 4, at 12.4 instead of 10.6 GiB (the 151673-token vocabulary does not divide
  by 4, so its two 1 GiB matrices stay whole on every chip).
- **Compile cost.** Rows compiled one at a time on an otherwise idle host (2026-12-02 after 04:50 UTC) took
  267-335 s of wall time (469-603 XLA CPU seconds), the two v6e:16x16 llama3_8b rows 519-532 s (941-975 CPU
  seconds): under the issue's 10 minutes per configuration. Three earlier rows that day shared the host with
  other work (560-703 s); the rows before ran two or three at once and took longer.
"""


CONTEXT_NOTE = """## Long videos on many chips (the context axis, issue #11) and packed rows (issue #15)

Rows `context`: a global batch of 16 on v5p:4x4x8 or v5e-256. A batch-only mesh (data x fsdp = chips) cannot
run it at all: each chip needs at least one whole sample, so 128 chips need a batch of 128 (`launch.plan`
refuses `--mesh 1,128,1 --batch 16`: "does not split over data x fsdp"). With `--mesh data,fsdp,context,tensor`
one 420-frame video spans `context` chips (420 frames divide by 4). Hosts whose chips hold the same batch
rows load the same samples (loading groups, docs/context.md), so the batch need only divide by the 16 groups of
a v5p:4x4x8's 32 hosts; the planner and the trainer count them with the same function. Rows `packed`: the
packed layout of docs/packing.md (`--pack P --seq-len N`); row `padded`: the same video batch before packing
(one sample per row padded to `max_seq_len` 16384); rows `one-video`: what a 16 GiB v5e chip needs to hold
one 420-frame video (a video per chip or per 2 chips; `lowmem.py` is `configs/lowmem.py`; the reading is in
docs/packing.md). A compute-bound row shows MFU 100 %: the roofline
takes the largest term as the step time, so its MFU is an upper bound. The FLOP tables below come from traces alone.
The v5p:4x4x8 context row's stored FLOPs predate counting
`shard_map` bodies once per device (the context resampler): 0.6 % low against the recount below.
"""


def _load(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    d = json.load(f)
  return dict(d, plans=[_flop_view(p) for p in d.get("plans", [])])


def _flop_view(p: dict) -> dict:
  """The plan with its roofline on the FLOP-scaled HBM term, which every stored row has (rows planned before
  2026-12-02 have no other), so that rows compare; `hbm_loop_s` keeps the planner's loop-weighted HBM term
  (`hlo.hbm_traffic`) where the row has it."""
  h, roof = p.get("hbm_bytes_accessed_per_chip"), p.get("roofline")
  if not h or not roof:
    return p
  bw = p["chip"]["hbm_bw"]
  terms = {"compute": roof["compute_s"], "hbm": h.get("flop_scaled", h.get("scaled", 0.0)) / bw,
           **{f"ici:{a}": t for a, t in roof["ici_s"].items()}, "dcn": roof["dcn_s"]}
  bound = max(terms, key=terms.get)
  step = terms[bound]
  view = dict(roof, hbm_s=terms["hbm"], step_s=step, bound=bound, serial_s=sum(terms.values()),
              mfu=roof["mfu"] * roof["step_s"] / step,
              tokens_per_s_per_chip=roof["tokens_per_s_per_chip"] * roof["step_s"] / step,
              hbm_loop_s=h["loop_weighted"] / bw if "loop_weighted" in h else None)
  return dict(p, roofline=view)


def _step(roof: dict) -> str:
  loop = f"; HBM loop-weighted {roof['hbm_loop_s']:.2f} s" if roof.get("hbm_loop_s") is not None else ""
  return f"{roof['step_s']:.2f} s ({roof['bound']}{loop})"


def _flops_tables(out_dir: str) -> list[str]:
  """Step FLOPs of `benchmarks/plan_flops.py` runs stored as docs/scaling/*_flops_*.jsonl (trace only)."""
  lines = []
  for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
    if not name.endswith(".jsonl") or "_flops_" not in name:
      continue
    with open(os.path.join(out_dir, name)) as f:
      recs = [json.loads(x) for x in f if x.strip()]
    if not recs:
      continue
    r0 = recs[0]
    lines += ["", f"## Step FLOPs by batch layout: {r0['size']} on {r0['topology']}, mesh "
                  f"{','.join(map(str, r0['mesh']))} (`{name}`)", "",
              "The jaxpr matmul count of the exact train step (`python benchmarks/plan_flops.py`; a trace, no "
              "TPU compile, so no memory or step time). `pad`: one sample per row padded to the length; `packP`: "
              "the packed layout with P samples per row (docs/packing.md).", "",
              "| layout | rows x samples/row | frames | decoder length | step FLOPs | FLOPs per sample | vs first |",
              "|---|---|---|---|---|---|---|"]
    for r in recs:
      lines.append(f"| {r['layout']} | {r['rows']} x {r['samples'] // r['rows']} | {r['frames']} | {r['seq_len']} | "
                   f"{r['step_flops']:.3g} | {r['flops_per_sample']:.3g} | "
                   f"{r['flops_per_sample'] / recs[0]['flops_per_sample']:.2f} |")
  return lines


def _why_not(plans: list) -> str:
  """Why no mesh of a row fits: the smallest compiled footprint, else the first compile error."""
  sized = [p for p in plans if "memory_per_chip" in p]
  if sized:
    p = min(sized, key=lambda p: p["memory_per_chip"]["total_bytes"])
    m = p["memory_per_chip"]
    return f"does not fit: {report._mesh(p)} needs {m['total_bytes'] / GIB:.1f} / {m['hbm_bytes'] / GIB:.0f} GiB"
  errors = [p["error"] for p in plans if p.get("error")]
  return errors[0] if errors else "no candidate mesh fits"


def _chip_s_per_sample(r: dict, plan: dict) -> float:
  """Chip-seconds of the roofline step per sample (a video; an image in a packed image row): the cost of a
  sample across chip kinds and meshes."""
  return plan["roofline"]["step_s"] * plan["chips"] / (r["batch"] * r.get("pack", 1))


def _scaling(r: dict) -> str:
  """The row's scaling, with its experiment config when not the preset (`one-video, lowmem.py`)."""
  return r["scaling"] + (f", {os.path.basename(r['config'])}" if "config" in r else "")


def _inference_table(loaded) -> list[str]:
  """Which single-host runtime serves one 420-frame question: the inference rows, one line each."""
  out = ["| runtime | chips | mesh | memory per chip | prefill (roofline) | serves a 420-frame question |",
         "|---|---|---|---|---|---|"]
  for r, d in loaded:
    if r["scaling"] != "inference":
      continue
    _, dims = parse_topology(r["topology"])
    kind, n = r["topology"].split(":")[0], math.prod(dims)
    head = f"| {kind}-{n} | {n} |"
    if d is None:
      out.append(head + " | | | to run |")
      continue
    ranked = report.rank(d.get("plans", []))
    if ranked:
      b = ranked[0]
      out.append(head + f" {report._mesh(b)} | {b['memory_per_chip']['total_bytes'] / GIB:.1f} / "
                 f"{b['memory_per_chip']['hbm_bytes'] / GIB:.0f} GiB | {_step(b['roofline'])} | yes |")
    else:
      out.append(head + f" | | | no: {d.get('error') or _why_not(d.get('plans', []))} |")
  return out + [""]


def render(rows, row_path, out_dir: str) -> None:
  loaded = [(r, _load(row_path(r))) for r in rows]
  done = [(r, d) for r, d in loaded if d is not None]
  plans = [p for _, d in done for p in d.get("plans", [])]
  walls = [p["compile_s"] / 60 for p in plans if p.get("compile_s")]
  cpus = [p["compile_phases_s"]["xla_compile_cpu_s"] for p in plans
          if (p.get("compile_phases_s") or {}).get("xla_compile_cpu_s")]
  cost = (f"the released-size compile took {min(walls):.0f}-{max(walls):.0f} minutes of wall time per mesh "
          "on the shared 2-core host (XLA's TPU compile is all but a minute of it)" if walls else "")
  cost += f"; XLA's compile was {min(cpus):.0f}-{max(cpus):.0f} CPU seconds where measured" if cpus else ""
  status = (f"All {len(rows)} rows computed" if len(done) == len(rows) else
            f"{len(done)} of {len(rows)} rows computed; the others are still to run")
  lines = [INTRO, "## Status", "", status + (f" ({cost}, see docs/planner.md)." if cost else "."), "",
           "| size | target | batch | scaling | status | meshes | best mesh | memory/chip | step | MFU | tokens/s/chip | "
           "chip-s per sample | compile per mesh |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r, d in loaded:
    head = f"| {r['size']} | {display_name(r['topology'])} | {r['batch']} | {_scaling(r)} |"
    if d is None:
      lines.append(head + " to run | | | | | | | | |")
      continue
    ranked = report.rank(d.get("plans", []))
    compiles = [p["compile_s"] for p in d.get("plans", []) if "compile_s" in p]
    ctime = (f"{min(compiles):.0f} s" if len(set(compiles)) == 1 else f"{min(compiles):.0f}-{max(compiles):.0f} s"
             ) if compiles else ""
    tried = len(d.get("plans", []))
    if not ranked:
      why = d.get("error") or _why_not(d.get("plans", []))
      lines.append(head + f" computed: {why} | {tried} | | | | | | | {ctime} |")
      continue
    b = ranked[0]
    lines.append(head + f" computed {d.get('computed_at', '')} | {tried} | {report._mesh(b)} | "
                 f"{b['memory_per_chip']['total_bytes'] / GIB:.1f} / "
                 f"{b['memory_per_chip']['hbm_bytes'] / GIB:.0f} GiB | {_step(b['roofline'])} | "
                 f"{100 * b['roofline']['mfu']:.1f}% | "
                 f"{b['roofline']['tokens_per_s_per_chip']:.0f} | {_chip_s_per_sample(r, b):.2f} | {ctime} |")
  lines += ["", READING, CONTEXT_NOTE]
  lines += _flops_tables(out_dir)
  lines += ["", "## Every compiled mesh of each row (fitting ones fastest first)", ""]
  for r, d in done:
    plans = d.get("plans", [])
    if not plans:
      continue
    lines += [f"### {r['size']} on {display_name(r['topology'])}, batch {r['batch']} ({_scaling(r)})", "",
              report.HEADER]
    ranked = report.rank(plans)
    lines += [report.row(p) for p in ranked[:3]]
    lines += [report.row(p) for p in plans if p not in ranked]
    lines.append("")
  lines += ["## Scaling curves", "", "![weak and strong scaling](scaling.png)" if done else
            "(no computed rows yet)", "",
            "## Inference on Colab / single-host runtimes", "",
            "One 420-frame question (batch 1, bf16 params, the prefill: vision tower, cubing, resampler and the "
            "decoder over the merged prompt into a KV cache of `max_seq_len` + 256 slots). The inference rows "
            "are part of the status table above (scaling `inference`); a runtime serves the question when its "
            "best mesh fits.", ""]
  lines += _inference_table(loaded)
  with open(os.path.join(out_dir + ".md"), "w") as f:
    f.write("\n".join(lines))
  if done:
    _plot(done, out_dir + ".png")


def _plot(done, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  series = {}
  for r, d in done:
    ranked = report.rank(d.get("plans", []))
    if ranked and r["scaling"] not in ("inference", "padded", "one-video"):
      key = (r["size"], r["topology"].split(":")[0], r["scaling"])
      series.setdefault(key, []).append((ranked[0]["chips"], ranked[0]))
  for key, pts in sorted(series.items()):
    pts.sort(key=lambda x: x[0])
    chips = [c for c, _ in pts]
    label = " ".join(key)
    axes[0].plot(chips, [p["memory_per_chip"]["total_bytes"] / GIB for _, p in pts], "o-", label=label)
    axes[1].plot(chips, [p["roofline"]["step_s"] for _, p in pts], "o-", label=label)
    axes[2].plot(chips, [100 * p["roofline"]["mfu"] for _, p in pts], "o-", label=label)
  for a, y in zip(axes, ("memory per chip (GiB)", "predicted step (s)", "predicted MFU (%)")):
    a.set_xscale("log", base=2)
    a.set_xlabel("chips")
    a.set_ylabel(y)
    a.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle("compiler estimates (roofline, not measurements): best fitting mesh per row")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
