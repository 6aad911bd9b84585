"""The CPU demo: procedural scene videos → TFDS → Grain → a small Quicksviewer trained from scratch through
stages 1-3 → learned cube boundaries vs the true scene cuts (and vs the uniform partition).

  python -m launch.demo --out runs/demo            # (bash launch/demo.sh installs first, then runs this)

Phases (each reuses its output when it exists, so a rerun resumes): 1. encode `--videos` training and
`--val-videos` held-out videos with PyAV (scenes with known cut seconds; captions list the scenes in order);
2. a tiny BPE tokenizer; 3. the TFDS ArrayRecord dataset (train + validation); 4. stages 1, 2, 3 with
`launch`'s trainer, each starting from the previous stage's checkpoint; 5. on the held-out videos: the
learned partition (η = 0) and the uniform one against the true cuts (precision / recall of the inner
boundaries, a match within ±1 frame, and exact) and the greedy answers to the training question, all through
the inference API (`qv_jax.infer`), with the answers' accuracy; 6. `boundaries.png`, `loss.png`,
`summary.json` and the cube timelines of three held-out videos (`timelines/<id>/timeline.png`) in `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

STAGE_STEPS = (150, 150, 1500)
STAGE_LR = (3e-3, 1e-3, 1e-3)


def add_run_args(p: argparse.ArgumentParser) -> None:
  """The training-run flags the demo and the compressor comparison share (stage_config reads them)."""
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--workers", type=int, default=1, help="Grain worker processes decoding videos")
  p.add_argument("--size", default="small", help="model size (configs/quicksviewer.py)")
  p.add_argument("--seed", type=int, default=0)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/demo")
  p.add_argument("--videos", type=int, default=1200, help="training videos")
  p.add_argument("--val-videos", type=int, default=96, help="held-out videos")
  p.add_argument("--steps", default=",".join(map(str, STAGE_STEPS)), help="optimizer steps of stages 1,2,3")
  p.add_argument("--lr", default=",".join(map(str, STAGE_LR)), help="learning rates of stages 1,2,3")
  add_run_args(p)
  p.add_argument("--plots", type=int, default=6, help="held-out videos drawn in boundaries.png")
  p.add_argument("--quick", action="store_true", help="a tiny run for tests: few videos and steps")
  args = p.parse_args(argv)
  if args.quick:
    args.videos, args.val_videos, args.steps, args.batch, args.workers = 16, 8, "2,2,4", 4, 0
    args.plots = 2
  args.steps = [int(s) for s in args.steps.split(",")]
  args.lr = [float(s) for s in args.lr.split(",")]
  if len(args.steps) != 3 or len(args.lr) != 3:
    p.error("--steps and --lr take three comma-separated values (stages 1, 2, 3)")
  return args


def make_data(out: str, args) -> dict:
  from data_pipeline import synthetic
  data = os.path.join(out, "data")
  paths = {}
  for split, n, seed in (("train", args.videos, args.seed), ("validation", args.val_videos, args.seed + 1)):
    jsonl = os.path.join(data, f"{split}.jsonl")
    if not os.path.exists(jsonl):
      synthetic.write_dataset(data, num_videos=n, seed=seed, split=split)
    paths[split] = jsonl
  return paths


def make_tokenizer(out: str, jsonl: str) -> str:
  from data_pipeline import synthetic
  from data_pipeline.tokenizer import build_tiny_tokenizer
  path = os.path.join(out, "tokenizer.json")
  if not os.path.exists(path):
    texts = [json.loads(line)["conversations"][1]["value"] for line in open(jsonl)]
    texts += [synthetic.QUESTION, "user assistant system", "0123456789.", " ".join(synthetic.COLOURS),
              " ".join(synthetic.SHAPES)]
    build_tiny_tokenizer(texts, path, "qwen2", vocab_size=320)
  return path


def build_tfds(out: str, paths: dict) -> str:
  from data_pipeline.tfds_builder import build_dataset
  tfds_dir = os.path.join(out, "tfds")
  report = build_dataset(jsonl=paths["train"], validation_jsonl=paths["validation"],
                         media_root=os.path.dirname(paths["train"]), data_dir=tfds_dir, name="scenes")
  logging.info("TFDS: %s", report)
  return tfds_dir


def stage_config(args, stage: int, out: str, tfds_dir: str, tokenizer: str):
  from configs.quicksviewer import get_config
  c = get_config(f"size={args.size},stage={stage}")
  d = c.data
  d.dataset_dir, d.dataset_name, d.tokenizer_path = tfds_dir, "scenes", tokenizer
  d.max_frames, d.frame_buckets = 16, (16,)
  d.max_text_len, d.max_seq_len = 128, 96
  d.batch_size, d.num_workers, d.shuffle_seed = args.batch, args.workers, args.seed + stage
  t = c.train
  t.total_steps = args.steps[stage - 1]
  t.learning_rate = args.lr[stage - 1]
  t.encode_images = False
  t.log_every = 10 if not args.quick else 1
  t.checkpoint_every = 10_000
  t.keep_checkpoints = 1
  t.seed = args.seed
  t.init_from = os.path.join(out, f"stage{stage - 1}") if stage > 1 else ""
  t.compilation_cache_dir = os.path.join(out, "compile_cache")
  t.progress_bar = sys.stderr.isatty()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data_parallel_devices(args.batch), 1, 1
  return c


def data_parallel_devices(batch: int) -> int:
  """The most devices (of those present) that split the batch evenly: 1 on a CPU, 8 on a TPU v2-8."""
  import math
  import jax
  return math.gcd(batch, jax.device_count())


def plot_boundaries(videos: list[dict], path: str) -> None:
  """One row per held-out video: true scenes as coloured spans, learned cube starts (solid) and the
  uniform partition's (dashed) as vertical lines."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from data_pipeline.synthetic import COLOURS
  fig, axes = plt.subplots(len(videos), 1, figsize=(10, 1.25 * len(videos) + 0.6), squeeze=False)
  for ax, v in zip(axes[:, 0], videos):
    for scene in v["scenes"]:
      rgb = [c / 255 for c in COLOURS[scene["colour"]]] if scene["colour"] else (0.85, 0.85, 0.85)
      ax.axvspan(scene["start"], min(scene["end"], v["num_frames"]), color=rgb, alpha=0.55, lw=0)
      ax.text((scene["start"] + min(scene["end"], v["num_frames"])) / 2, 0.5, scene["shape"] or "title",
              ha="center", va="center", fontsize=8)
    for f in v["learned"][1:]:
      ax.axvline(f, color="black", lw=2.5, ymin=0.5, ymax=1.0)
    for f in v["uniform"][1:]:
      ax.axvline(f, color="dimgray", lw=1.5, ls="--", ymin=0.0, ymax=0.5)
    ax.set_xlim(0, v["num_frames"])
    ax.set_xticks(range(v["num_frames"] + 1))
    ax.set_yticks([])
    ax.set_title(f"{v['id']}: true «{v['caption']}»  generated «{v['generated']}»", fontsize=8, loc="left")
  axes[-1, 0].set_xlabel("sampled frame (1 fps); top half: learned cube starts (solid), "
                         "bottom half: uniform (dashed); colours: true scenes")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_losses(workdirs: list[str], path: str) -> None:
  """Training loss (and CE) over the three stages, one global step axis."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from qv_jax.train.metrics import read_metrics
  fig, ax = plt.subplots(figsize=(8, 4))
  offset = 0
  for i, w in enumerate(workdirs):
    rows = [r for r in read_metrics(w) if "loss" in r]
    if not rows:
      continue
    steps = [offset + r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label=f"stage {i + 1}")
    offset = steps[-1]
    ax.axvline(offset, color="gray", lw=0.5)
  ax.set_xlabel("optimizer step (stages back to back)")
  ax.set_ylabel("loss (token-mean CE + 0.001·aux)")
  ax.set_yscale("log")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def answer_summary(result: dict) -> dict:
  """The held-out videos asked the training question through `qv_jax.infer.answer_batch`: accuracy of
  the answers (exact caption, per scene) beside the boundary scores; videos that failed are counted."""
  from data_pipeline.synthetic import QUESTION
  return {"question": QUESTION, **result["captions"], "failed": len(result["skipped"])}


def start_run(out: str) -> str:
  """Logging, absl flags marked parsed (Grain workers outside absl.app.run), the output folder; its path."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  import absl.flags
  absl.flags.FLAGS.mark_as_parsed()
  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  return out


def prepare_data(out: str, args) -> tuple[dict, str, str]:
  """Phases 1-3 (videos, tokenizer, TFDS), each reused when present: (jsonl paths, tokenizer, TFDS dir)."""
  paths = make_data(out, args)
  tokenizer = make_tokenizer(out, paths["train"])
  return paths, tokenizer, build_tfds(out, paths)


def main(argv=None) -> int:
  args = parse_args(argv)
  out = start_run(args.out)
  t_start = time.time()
  times = {}

  t0 = time.time()
  paths, tokenizer, tfds_dir = prepare_data(out, args)
  times["data_s"] = time.time() - t0

  import jax
  from data_pipeline.loader import make_data as loader_data
  from qv_jax.train.loop import train
  from qv_jax.train.metrics import read_metrics
  stages = []
  for stage in (1, 2, 3):
    t0 = time.time()
    config = stage_config(args, stage, out, tfds_dir, tokenizer)
    workdir = os.path.join(out, f"stage{stage}")
    logging.info("stage %d: %d steps at lr %g", stage, config.train.total_steps, config.train.learning_rate)
    summary = train(config, workdir=workdir, data=loader_data, devices=jax.devices()[:config.mesh.data])
    records = [r for r in read_metrics(workdir) if "loss" in r]
    stages.append({"stage": stage, "steps": config.train.total_steps, "learning_rate": config.train.learning_rate,
                   "final_loss": records[-1]["loss"] if records else None,
                   "step_time_s": summary.step_time_s, "seconds": time.time() - t0})
    times[f"stage{stage}_s"] = time.time() - t0

  t0 = time.time()
  from qv_jax.infer.scene_eval import evaluate
  final = stage_config(args, 3, out, tfds_dir, tokenizer)
  with open(os.path.join(out, "data", "validation_truth.json")) as f:
    truth = json.load(f)
  result = evaluate(final, os.path.join(out, "stage3"), paths["validation"], truth,
                    timeline_dir=os.path.join(out, "timelines"), timelines=3)
  plot_boundaries(result["videos"][:args.plots], os.path.join(out, "boundaries.png"))
  plot_losses([os.path.join(out, f"stage{s}") for s in (1, 2, 3)], os.path.join(out, "loss.png"))
  times["eval_s"] = time.time() - t0
  times["total_s"] = time.time() - t_start
  summary = {"config": {"size": args.size, "videos": args.videos, "val_videos": args.val_videos,
                        "batch": args.batch, "frames": 16, "steps": args.steps, "learning_rates": args.lr},
             "stages": stages, "boundaries": result["scores"], "captions": result["captions"],
             "answers": answer_summary(result),
             "seconds": times, "plots": ["boundaries.png", "loss.png"],
             "timelines": [os.path.relpath(p, out) for p in result["timelines"]]}
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(json.dumps({"boundaries": result["scores"], "answers": summary["answers"], "seconds": times}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
