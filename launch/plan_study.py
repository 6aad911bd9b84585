"""The scaling study of docs/scaling.md: the stage-3 train step of the released sizes at 420 frames on
v5e, v5p and v6e slices, weak scaling (batch = chips) and strong scaling (batch 64), every number from
`launch.plan`. Results are kept per row under docs/scaling/, so a rerun only compiles missing rows.

  python -m launch.plan_study                       # everything still missing, then docs/scaling.md + PNG
  python -m launch.plan_study --only qwen2_7b:v5p --max-candidates 3 --jobs 2
  python -m launch.plan_study --render              # only rewrite the document from the stored rows
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

SIZES = ("qwen2_7b", "llama3_8b")
COLAB = ("v5e:1x1", "v5e:2x2", "v5e:2x4", "v6e:1x1", "v6e:2x2", "v6e:2x4")   # v5e-1/4/8, v6e-1/4/8
FRAMES = 420
VIDEO_BUCKET = 7168   # one 420-frame video per decoder row in its sequence bucket (docs/packing.md)
# Weak scaling: a fixed number of videos per chip for each chip kind, global batch proportional to chips.
# A v5p chip (95 GiB) holds one 420-frame video (31.5 GiB at v5p:4x4x4); a v6e (32 GiB) half of one (a quarter
# on the 8-chip slice), a v5e (16 GiB) a quarter: the rest of the video goes to `context` chips (or `tensor`,
# where the optimizer state, sharded over fsdp x tensor only, would not fit a small slice otherwise).
WEAK = (("v5p:2x2x2", 8, "1,8,1,1"), ("v5p:2x4x4", 32, "1,32,1,1"), ("v5p:4x4x8", 128, "1,128,1,1"),
        ("v5p:8x8x8", 512, "1,512,1,1"),
        ("v6e:2x4", 2, "1,2,1,4"), ("v6e:8x8", 32, "1,32,2,1"), ("v6e:16x16", 128, "1,128,2,1"),
        ("v5e:4x4", 4, "1,4,1,4"), ("v5e:8x8", 16, "1,16,4,1"), ("v5e:16x16", 64, "1,64,4,1"))
# Strong scaling: global batch 64 on the slices that can hold it (v5p:4x4x4 is the `packed` row below).
STRONG = (("v5p:2x4x4", "1,32,1,1"), ("v5p:4x4x8", "1,64,2,1"), ("v5p:8x8x8", "1,64,4,2"),
          ("v6e:16x16", "1,64,4,1"))
# Fixed-mesh rows: one long video spread over chips with the context axis (issue #11: batch 16 cannot
# split over 128 chips by batch alone; 420 frames divide by context 4), and the packed layout (#15: one
# 420-frame video per row in a 7168 bucket, the image part of the stage-3 mix in a 2048 bucket; `padded`, the
# same batch padded to max_seq_len 16384 as before packing), and what a 16 GiB v5e chip needs to hold one
# 420-frame video (`one-video`: a video per chip or per 2 chips, the preset or `configs/lowmem.py`).
LOWMEM = "configs/lowmem.py"
EXTRA = (
    dict(size="qwen2_7b", topology="v5p:4x4x8", batch=16, scaling="context", mesh="1,16,4,2"),
    dict(size="qwen2_7b", topology="v5e:16x16", batch=16, scaling="context", mesh="1,16,4,4"),
    dict(size="qwen2_7b", topology="v5p:4x4x4", batch=64, scaling="packed", mesh="1,64,1", pack=1, seq_len=7168),
    dict(size="qwen2_7b", topology="v5p:4x4x4", batch=64, scaling="packed", mesh="1,64,1", pack=4, seq_len=2048,
         frames=5),
    dict(size="qwen2_7b", topology="v5p:4x4x4", batch=64, scaling="padded", mesh="1,64,1"),
    dict(size="qwen2_7b", topology="v5e:8x8", batch=64, scaling="one-video", mesh="1,64,1", pack=1, seq_len=7168),
    dict(size="qwen2_7b", topology="v5e:8x8", batch=64, scaling="one-video", mesh="1,64,1", pack=1, seq_len=7168,
         config=LOWMEM),
    dict(size="qwen2_7b", topology="v5e:8x8", batch=32, scaling="one-video", mesh="1,32,1,2", pack=1, seq_len=7168),
    dict(size="qwen2_7b", topology="v5e:8x8", batch=32, scaling="one-video", mesh="1,32,2,1", pack=1, seq_len=7168),
    dict(size="qwen2_7b", topology="v5e:8x8", batch=32, scaling="one-video", mesh="1,32,2,1", pack=1, seq_len=7168,
         config=LOWMEM),
    # half a video per v6e chip on the 8-chip slice (tensor 2); neither it nor the weak row's quarter fits
    dict(size="qwen2_7b", topology="v6e:2x4", batch=4, scaling="weak", mesh="1,4,1,2", pack=1, seq_len=7168),
    # a quarter video per v5e chip on v5e-64 with the weights over fsdp x tensor 4 (the weak row's context 4
    # leaves the AdamW state over fsdp 16 alone, 16.96 GiB of 16)
    dict(size="qwen2_7b", topology="v5e:8x8", batch=16, scaling="weak", mesh="1,16,1,4", pack=1, seq_len=7168),
    # a question of batch 1 on an fsdp mesh runs whole on every chip; a tensor mesh splits its work
    dict(size="qwen2_7b", topology="v5e:2x2", batch=1, scaling="inference", step="prefill", mesh="1,1,1,4"),
)
SCALINGS = ("weak", "strong", "inference", "context", "packed", "padded", "one-video")
STRONG_BATCH = 64
OUT = "docs/scaling"


def rows() -> list[dict]:
  video = dict(pack=1, seq_len=VIDEO_BUCKET)
  out = []
  for size in SIZES:
    out += [dict(size=size, topology=t, batch=b, scaling="weak", mesh=m, **video) for t, b, m in WEAK]
    out += [dict(size=size, topology=t, batch=STRONG_BATCH, scaling="strong", mesh=m, **video) for t, m in STRONG]
  for topo in COLAB:
    out.append(dict(size="qwen2_7b", topology=topo, batch=1, scaling="inference", step="prefill"))
  return out + [dict(r) for r in EXTRA]


def row_path(r: dict) -> str:
  step = r.get("step", "train")
  extra = "".join(f"_{k}{r[k]}" for k in ("pack", "seq_len", "frames") if k in r)
  extra += f"_m{r['mesh'].replace(',', 'x')}" if "mesh" in r else ""
  extra += f"_{os.path.splitext(os.path.basename(r['config']))[0]}" if "config" in r else ""
  return os.path.join(OUT, f"{r['size']}_{r['topology'].replace(':', '-')}_b{r['batch']}_{step}{extra}.json")


def run_row(r: dict, args) -> dict:
  from launch import plan
  argv = ["--config", f"{r.get('config', 'configs/quicksviewer.py')}:size={r['size']},stage=3", "--topology", r["topology"],
          "--mesh", r.get("mesh", "auto"), "--batch", str(r["batch"]), "--frames", str(r.get("frames", FRAMES)),
          "--max-candidates", str(args.max_candidates), "--jobs", str(args.jobs), "--out", "/tmp/qv_plan_study",
          "--step", r.get("step", "train")]
  argv += [a for k in ("pack", "seq_len") if k in r for a in (f"--{k.replace('_', '-')}", str(r[k]))]
  pargs = plan.parse_args(argv)
  config = plan.load_config(pargs.config)
  t0 = time.perf_counter()
  try:
    jobs = plan.jobs_from(pargs, config)
  except Exception as e:  # noqa: BLE001  (a batch no mesh splits: recorded, not fatal)
    return dict(r, error=str(e), plans=[])
  results = plan.run_jobs(pargs, jobs)
  return dict(r, plans=results, wall_s=time.perf_counter() - t0, computed_at=time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                            time.gmtime()))


def _matches(r: dict, spec: str) -> bool:
  parts = spec.split(":")
  scaling = parts.pop() if parts[-1] in SCALINGS else None
  size, target = parts[0], ":".join(parts[1:])
  return (r["size"] == size and r["topology"].startswith(target)
          and (scaling is None or r["scaling"] == scaling))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default="", help="size:target-prefix filters, comma-separated (qwen2_7b:v5p, "
                 "qwen2_7b:v5e:2x2); add :inference / :weak / :strong to pick a scaling")
  p.add_argument("--max-candidates", type=int, default=3, help="meshes compiled per row")
  p.add_argument("--jobs", type=int, default=2)
  p.add_argument("--limit", type=int, default=0, help="compile at most this many missing rows")
  p.add_argument("--render", action="store_true", help="only rewrite docs/scaling.md from stored rows")
  args = p.parse_args(argv)
  os.makedirs(OUT, exist_ok=True)
  todo = [r for r in rows() if not os.path.exists(row_path(r))]
  if args.only:
    todo = [r for r in todo if any(_matches(r, f) for f in args.only.split(","))]
  if args.limit:
    todo = todo[:args.limit]
  if not args.render:
    for r in todo:
      print(f"plan_study: {r['size']} on {r['topology']} batch {r['batch']} ...", file=sys.stderr, flush=True)
      result = run_row(r, args)
      with open(row_path(r), "w") as f:
        json.dump(result, f, indent=1, default=str)
  from launch.plan_study_doc import render
  render(rows(), row_path, OUT)
  return 0


if __name__ == "__main__":
  sys.exit(main())
