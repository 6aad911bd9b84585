"""The compressor kinds compared on the CPU demo's procedural scene videos at equal visual-token budgets:
cubing vs uniform vs score_gating vs question_select.

  python -m launch.compare_compressors --out runs/compare          # 54 min on 2 heavily shared cores
  python -m launch.compare_compressors --out runs/compare_q --quick   # a tiny run for the test

Phases (each reuses its output when it exists, so a rerun resumes):
1. the demo's data, tokenizer and TFDS dataset (`launch/demo.py`), and its stages 1-2 (cubing), shared by
   every kind;
2. per kind, a short stage 3 from the stage-2 checkpoint with `model.compressor.kind` set (all kinds the
   same steps and learning rate, each at its training budget, `TRAIN_BUDGET` tokens); `score_gating`
   starts from a converted copy of the stage-2 params (its `policy` is new) and then trains its policy
   alone by RL (`train.score_rollouts`, the "videos" curriculum only: the pseudo-video warm-up is skipped
   to keep the run short);
3. every trained kind answers the held-out videos at each budget of `BUDGETS` it can meet, through the
   inference API (`qv_jax.infer.answer_batch`, greedy): exact-caption and per-scene accuracy, cube
   boundary precision / recall / F1 within ±1 frame (cubing and uniform only: the other kinds keep frames
   or tokens, not a partition), the prompt length (measured: padded rows of the last batch are copies of
   its first video) and the visual tokens per video (from each answer's selection), the decoder
   prefill's matmul FLOPs and time at the mean prompt length (batch 1, best of `--repeats`: the machine
   is shared) and the compressor's time per video (median over batches, the first batch's compile
   included only when there is one batch; tower excluded; question_select's scoring pass through the
   decoder layers included);
4. `results.json`, `table.md` (the rows of `results.json`, rounded) and `accuracy_vs_budget.png`.

The budget B counts the visual tokens one 16-frame video (the bucket F) puts in the prompt, and is an
inference-time knob for every kind (the sweep never retrains): cubing / uniform keep the thumbnail (T
tokens) and choose `frames_per_cube` so that T + Q·(k+1) = B (k + 1 = max(round(F/FPQ) - 1, 1) + 1 cubes;
only B = T + Q·c with c ≥ 2 is reachable); score_gating keeps the global top-K = B tokens
(keep_ratio = B / (F·Q)); question_select keeps M = B frames, one pooled token each (XComp's one token per
frame; B ≤ F). Shorter videos (12-15 s) get fewer cubes from cubing, so the measured tokens per video are
reported beside B. Accuracy on this small data is low for every kind; the uniform baseline is in the same
table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import types

KINDS = ("cubing", "uniform", "score_gating", "question_select")
BUDGETS = (8, 12, 16, 24)
TRAIN_BUDGET = {"cubing": 16, "uniform": 16, "score_gating": 16, "question_select": 8}
SHARED_STEPS = (150, 150)
SHARED_LR = (3e-3, 1e-3)
STAGE3_LR = 1e-3
POLICY_LR = 1e-3
SCORE_ROLLOUTS = 4


def parse_args(argv=None):
  from launch.demo import add_run_args
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/compare")
  p.add_argument("--videos", type=int, default=480, help="training videos")
  p.add_argument("--val-videos", type=int, default=48, help="held-out videos (a multiple of --batch)")
  p.add_argument("--shared-steps", default=",".join(map(str, SHARED_STEPS)), help="steps of stages 1,2")
  p.add_argument("--stage3-steps", type=int, default=250, help="stage-3 steps of every kind")
  p.add_argument("--policy-steps", type=int, default=40, help="score_gating policy RL steps")
  p.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="visual-token budgets B")
  p.add_argument("--kinds", default=",".join(KINDS))
  add_run_args(p)
  p.add_argument("--repeats", type=int, default=5, help="timed prefill repeats")
  p.add_argument("--quick", action="store_true", help="a tiny run for tests: few videos, steps, budgets")
  args = p.parse_args(argv)
  if args.quick:
    args.videos, args.val_videos, args.batch, args.workers = 6, 3, 3, 0   # odd batch: one device
    args.shared_steps, args.stage3_steps, args.policy_steps, args.repeats = "1,1", 2, 1, 1
    args.budgets = "8,16"
  args.shared_steps = [int(s) for s in args.shared_steps.split(",")]
  args.budgets = sorted({int(b) for b in args.budgets.split(",")})
  args.kinds = [k for k in args.kinds.split(",") if k]
  if len(args.shared_steps) != 2:
    p.error("--shared-steps takes two comma-separated values (stages 1, 2)")
  bad = [k for k in args.kinds if k not in KINDS]
  if bad:
    p.error(f"--kinds: {bad}; expected some of {KINDS}")
  if args.val_videos % args.batch:
    p.error(f"--val-videos {args.val_videos} must be a multiple of --batch {args.batch}")
  return args


def demo_args(args):
  """The namespace `launch.demo.stage_config` reads (stage 3's steps / lr are set per kind)."""
  return types.SimpleNamespace(size=args.size, batch=args.batch, workers=args.workers, seed=args.seed,
                               quick=args.quick, steps=[*args.shared_steps, args.stage3_steps],
                               lr=[*SHARED_LR, STAGE3_LR])


# --- budgets -----------------------------------------------------------------------------------------

def compressor_dims(config) -> dict:
  c = config.model.compressor
  frames = int(config.data.frame_buckets[0])
  return {"frames": frames, "queries": int(c.num_queries),
          "thumbnail": int(c.grid_size) ** 2 // int(c.thumbnail_pool)}


def budget_knob(kind: str, budget: int, dims: dict) -> dict | None:
  """The `model.compressor` fields that make `kind` spend `budget` visual tokens on an F-frame video, or
  None when the kind cannot meet it exactly."""
  f, q, t = dims["frames"], dims["queries"], dims["thumbnail"]
  if kind in ("cubing", "uniform"):
    for fpq in range(1, f + 1):
      if t + q * (max(round(f / fpq) - 1, 1) + 1) == budget:
        return {"frames_per_cube": fpq}
    return None
  if kind == "score_gating":
    return {"keep_ratio": budget / (f * q)} if 1 <= budget <= f * q else None
  if kind == "question_select":
    return {"select_frames": budget, "select_tokens": "pooled"} if 1 <= budget <= f else None
  raise ValueError(f"unknown kind {kind!r}")


# --- training ---------------------------------------------------------------------------------------

def _finished(workdir: str, steps: int) -> bool:
  from qv_jax.train.checkpoint import saved_step_dirs
  return os.path.isdir(workdir) and steps in saved_step_dirs(workdir)


def run_stage(config, workdir: str) -> dict:
  """Trains (or resumes) one stage; a finished one is not reopened. Returns its record."""
  import jax
  from data_pipeline.loader import make_data
  from qv_jax.train.loop import train
  from qv_jax.train.metrics import read_metrics
  t0 = time.time()
  steps = int(config.train.total_steps)
  if not _finished(workdir, steps):
    logging.info("%s: %d steps at lr %g", workdir, steps, config.train.learning_rate)
    train(config, workdir=workdir, data=make_data, devices=jax.devices()[:config.mesh.data])
  rows = [r for r in read_metrics(workdir) if "loss" in r]
  return {"workdir": os.path.basename(os.path.dirname(workdir)) + "/" + os.path.basename(workdir),
          "steps": steps, "first_loss": rows[0]["loss"] if rows else None,
          "final_loss": rows[-1]["loss"] if rows else None, "seconds": time.time() - t0}


def as_converted(workdir: str, config, out_dir: str) -> str:
  """The params of a trainer work directory written as a `qv-convert` output, so a kind with extra params
  (`score_gating`'s policy) can start from them (`train.init_from` loads a converted directory partially)."""
  if os.path.isfile(os.path.join(out_dir, "conversion.json")):
    return out_dir
  import jax
  from flax import nnx
  from qv_jax.convert.writer import ParamWriter, flatten, write_metadata
  from qv_jax.config import validate
  from qv_jax.model.quicksviewer import Quicksviewer
  from qv_jax.train import checkpoint as ckpt
  config = validate(config)
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: Quicksviewer(config.model, max_seq_len=config.data.max_seq_len, rngs=nnx.Rngs(0)))))
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), abstract)
  params = ckpt.load_params(workdir, target, config.model.size)
  writer = ParamWriter(out_dir)
  for path, value in flatten(params).items():
    writer.add(path, jax.device_get(value))
  writer.finalize()
  write_metadata(out_dir, config, {"source": workdir,
                                   "params": {p: [list(s), d] for p, (s, d) in writer.written.items()}})
  return out_dir


def kind_config(args, kind: str, out: str, tfds_dir: str, tokenizer: str, *, policy: bool = False):
  from launch.demo import stage_config
  c = stage_config(demo_args(args), 3, out, tfds_dir, tokenizer)
  c.model.compressor.kind = kind
  c.model.compressor.update(budget_knob(kind, TRAIN_BUDGET[kind], compressor_dims(c)))
  if policy:
    t = c.train
    t.total_steps, t.learning_rate = args.policy_steps, POLICY_LR
    t.score_rollouts, t.trainable_override, t.score_curriculum = SCORE_ROLLOUTS, ("policy",), "videos"
    t.init_from = os.path.join(out, kind, "stage3")
  return c


def train_kind(args, kind: str, out: str, tfds_dir: str, tokenizer: str) -> tuple[str, list[dict]]:
  """Stage 3 of `kind` (and the policy RL of score_gating). Returns (final work directory, records)."""
  config = kind_config(args, kind, out, tfds_dir, tokenizer)
  if kind == "score_gating":
    from launch.demo import stage_config
    cubing = stage_config(demo_args(args), 2, out, tfds_dir, tokenizer)
    config.train.init_from = as_converted(os.path.join(out, "stage2"), cubing, os.path.join(out, "stage2_params"))
  records = [dict(run_stage(config, os.path.join(out, kind, "stage3")), phase="stage3")]
  workdir = os.path.join(out, kind, "stage3")
  if kind == "score_gating" and args.policy_steps > 0:
    workdir = os.path.join(out, kind, "policy")
    records.append(dict(run_stage(kind_config(args, kind, out, tfds_dir, tokenizer, policy=True), workdir),
                        phase="policy_rl"))
  return workdir, records


# --- evaluation -------------------------------------------------------------------------------------

def at_budget(model, knob: dict):
  """The loaded model with compressor fields replaced (same params, a new graph): the budget is an
  inference-time setting."""
  import dataclasses
  from flax import nnx
  from qv_jax.config import validate
  from qv_jax.model.quicksviewer import Quicksviewer
  m = model.config.model
  config = validate(dataclasses.replace(model.config, model=dataclasses.replace(
      m, compressor=dataclasses.replace(m.compressor, **knob))))
  with model.context():
    graphdef, _ = nnx.split(nnx.eval_shape(
        lambda: Quicksviewer(config.model, max_seq_len=config.data.max_seq_len, rngs=nnx.Rngs(0))))
  return dataclasses.replace(model, config=config, graphdef=graphdef)


class PromptLengths:
  """Records the merged prompt length of every row `runner.prepare` sees."""

  def __enter__(self):
    from qv_jax.infer import runner
    self.runner, self.prepare, self.rows = runner, runner.prepare, []

    def spy(model, batch):
      prepared = self.prepare(model, batch)
      self.rows += [int(m) for m in prepared.length]
      return prepared
    runner.prepare = spy
    return self

  def __exit__(self, *exc):
    self.runner.prepare = self.prepare


def visual_tokens(kind: str, answer, knob: dict, dims: dict) -> int:
  """The visual tokens one answered video had in its prompt, from its selection (`answer.cubes`: the
  cubes, or the kept frames): cubing / uniform T + Q per cube; score_gating its top-K (all its tokens
  when fewer); question_select one token per kept frame."""
  q, n = dims["queries"], answer.num_frames
  if kind in ("cubing", "uniform"):
    return dims["thumbnail"] + q * len(answer.cubes)
  if kind == "score_gating":
    from qv_jax.model.compressors.score_gating import budget_tokens
    return min(budget_tokens(dims["frames"], q, knob["keep_ratio"]), n * q)
  return len(answer.cubes)


def prefill_cost(model, length: int, repeats: int) -> dict:
  """Matmul FLOPs and time (best of `repeats`: the machine is shared) of the decoder prefill of one
  prompt of `length` tokens."""
  import jax
  import jax.numpy as jnp
  from qv_jax.infer import runner
  from qv_jax.model.generate import Generator
  from qv_jax.train.flops import matmul_flops
  d = int(model.config.model.decoder.hidden_size)
  embeds = jnp.zeros((1, length, d), jnp.dtype(model.config.model.compute_dtype))
  mask = jnp.ones((1, length), bool)
  positions = jnp.arange(length, dtype=jnp.int32)[None]
  with model.context():
    gen = Generator(runner.decoder_of(model), max_new_tokens=1, eos_id=model.eos_id, pad_id=model.pad_id,
                    layer_params=model.layer_params)

    def start(e, m, p):
      return gen.start(inputs_embeds=e, mask=m, positions=p)
    flops = matmul_flops(start, embeds, mask, positions)
    jax.block_until_ready(start(embeds, mask, positions))
    times = []
    for _ in range(max(repeats, 1)):
      t0 = time.perf_counter()
      jax.block_until_ready(start(embeds, mask, positions))
      times.append(time.perf_counter() - t0)
  return {"prefill_flops": float(flops), "prefill_s": float(min(times))}


def evaluate_budget(model, kind: str, budget: int, knob: dict, dims: dict, records: list[dict], truth: dict,
                    root: str, repeats: int) -> dict:
  """One (kind, budget) row: answers, accuracy, boundary scores, tokens, prefill cost."""
  import numpy as np
  from qv_jax.infer import answer_batch
  from qv_jax.infer.scene_eval import _question, caption_scores, scores
  variant = at_budget(model, knob)
  d = variant.config.data
  items = [(os.path.join(root, r["video"]), _question(r)) for r in records]
  t0 = time.time()
  with PromptLengths() as lengths:
    answers = answer_batch(variant, items, max_new_tokens=32, num_frames=int(d.max_frames), fps=float(d.fps),
                           batch_size=int(d.batch_size), errors="return")
  videos = [{"id": r["id"], "cuts": truth[r["id"]]["cuts"], "caption": truth[r["id"]]["caption"],
             "generated": a.text, "starts": [c.start_frame for c in a.cubes]}
            for r, a in zip(records, answers) if a.error is None]
  ok = [a for a in answers if a.error is None]
  prompt = float(np.mean(lengths.rows))
  row = {"kind": kind, "budget": budget, "knob": knob, **caption_scores(videos),
         "failed": len(answers) - len(ok), "prompt_tokens": prompt,
         "visual_tokens": float(np.mean([visual_tokens(kind, a, knob, dims) for a in ok])),
         "compressor_s": float(np.median([a.timings["compressor_s"] for a in ok])) / int(d.batch_size),
         "answer_s": time.time() - t0, "examples": [(v["caption"], v["generated"]) for v in videos[:3]]}
  if kind in ("cubing", "uniform"):
    s = scores(videos, "starts", 1)
    row.update(boundary_precision=s["precision"], boundary_recall=s["recall"], boundary_f1=s["f1"])
  row.update(prefill_cost(variant, int(round(prompt)), repeats))
  return row


def evaluate_kind(args, kind: str, workdir: str, out: str, paths: dict, dims: dict) -> list[dict]:
  """Every budget of `args.budgets` the kind can meet; each row cached in out/results/."""
  import jax
  from qv_jax.infer import load
  from qv_jax.sharding import make_mesh
  from tqdm.auto import tqdm
  cache = os.path.join(out, "results")
  os.makedirs(cache, exist_ok=True)
  records = [json.loads(line) for line in open(paths["validation"])]
  with open(os.path.join(out, "data", "validation_truth.json")) as f:
    truth = json.load(f)
  model, rows = None, []
  budgets = [b for b in args.budgets if budget_knob(kind, b, dims) is not None]
  for budget in tqdm(budgets, desc=f"evaluate {kind}", disable=not sys.stderr.isatty()):
    file = os.path.join(cache, f"{kind}_b{budget}.json")
    if os.path.exists(file):
      rows.append(json.load(open(file)))
      continue
    if model is None:
      model = load(workdir, mesh=make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    knob = budget_knob(kind, budget, dims)
    row = evaluate_budget(model, kind, budget, knob, dims, records, truth, os.path.dirname(paths["validation"]),
                          args.repeats)
    with open(file + ".tmp", "w") as f:
      json.dump(row, f, indent=1)
    os.replace(file + ".tmp", file)
    rows.append(row)
  return rows


def main(argv=None) -> int:
  args = parse_args(argv)
  from launch import compare_report
  from launch.demo import prepare_data, stage_config, start_run
  out = start_run(args.out)
  t_start = time.time()
  seconds = {}
  t0 = time.time()
  paths, tokenizer, tfds_dir = prepare_data(
      out, types.SimpleNamespace(videos=args.videos, val_videos=args.val_videos, seed=args.seed))
  seconds["data_s"] = time.time() - t0
  training = []
  for stage in (1, 2):
    t0 = time.time()
    training.append(dict(run_stage(stage_config(demo_args(args), stage, out, tfds_dir, tokenizer),
                                   os.path.join(out, f"stage{stage}")), phase=f"stage{stage}", kind="shared"))
    seconds[f"stage{stage}_s"] = time.time() - t0
  rows = []
  for kind in args.kinds:
    t0 = time.time()
    workdir, records = train_kind(args, kind, out, tfds_dir, tokenizer)
    training += [dict(r, kind=kind) for r in records]
    seconds[f"{kind}_train_s"] = time.time() - t0
    t0 = time.time()
    dims = compressor_dims(stage_config(demo_args(args), 3, out, tfds_dir, tokenizer))
    rows += evaluate_kind(args, kind, workdir, out, paths, dims)
    seconds[f"{kind}_eval_s"] = time.time() - t0
  seconds["total_s"] = time.time() - t_start
  results = {"config": {"size": args.size, "videos": args.videos, "val_videos": args.val_videos,
                        "batch": args.batch, "frames": 16, "shared_steps": args.shared_steps,
                        "stage3_steps": args.stage3_steps, "policy_steps": args.policy_steps,
                        "score_rollouts": SCORE_ROLLOUTS, "train_budget": TRAIN_BUDGET,
                        "budgets": args.budgets, "kinds": args.kinds},
             "training": training, "rows": rows, "seconds": seconds}
  compare_report.write(out, results)
  print(json.dumps({"rows": [{k: r[k] for k in ("kind", "budget", "exact_match", "scene_accuracy")}
                             for r in rows], "seconds": seconds}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
