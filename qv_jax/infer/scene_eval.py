"""Evaluation of a trained model on a held-out split through the inference API (`qv_jax.infer`): the
learned partition (η = 0) and the uniform one against known scene cuts, and the greedy answers to the
split's question. Used by the CPU demo (`launch/demo.py`).

Boundary scores count the inner boundaries (frame 0 always starts a cube and is left out): a predicted
boundary matches a true cut within ±`tolerance` frames, each cut matching at most one prediction;
precision = matches / predictions, recall = matches / cuts.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from qv_jax.infer.timeline import uniform_starts, write_timeline

__all__ = ["boundary_matches", "caption_scores", "evaluate", "scores", "uniform_starts"]


def boundary_matches(predicted, true, tolerance: int = 1) -> int:
  """Matched inner boundaries (greedy, nearest first, each cut used once)."""
  unused = sorted(true)
  tp = 0
  for p in sorted(predicted):
    best = min(unused, key=lambda c: abs(c - p), default=None)
    if best is not None and abs(best - p) <= tolerance:
      tp += 1
      unused.remove(best)
  return tp


def scores(videos: list[dict], key: str, tolerance: int) -> dict[str, float]:
  tp = sum(boundary_matches(v[key][1:], v["cuts"], tolerance) for v in videos)
  pred = sum(len(v[key]) - 1 for v in videos)
  true = sum(len(v["cuts"]) for v in videos)
  precision = tp / pred if pred else 0.0
  recall = tp / true if true else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1, "matched": tp, "predicted": pred, "true": true}


def _question(record: dict) -> str:
  """The first human turn without its `<image>` / `<video>` placeholder."""
  value = record["conversations"][0]["value"]
  return value.replace("<image>", "").replace("<video>", "").strip()


def evaluate(config, workdir: str, jsonl: str, truth: dict[str, Any], *, max_new_tokens: int = 32,
             timeline_dir: str | None = None, timelines: int = 3) -> dict:
  """Answers every video of the held-out `jsonl` (media relative to its directory) with the model of
  `workdir` (`qv_jax.infer.load`, one device) through `answer_batch`. `truth`: {video id: {"cuts": [...],
  "caption": str, "scenes": [...]}}. Writes the timelines of the first `timelines` videos under
  `timeline_dir` when given. Returns {"videos", "scores", "captions", "skipped", "timelines"}."""
  from qv_jax.infer import answer_batch, load
  from qv_jax.sharding import make_mesh

  records = [json.loads(line) for line in open(jsonl)]
  root = os.path.dirname(os.path.abspath(jsonl))
  model = load(workdir, mesh=make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
  d = model.config.data
  fpq = int(model.config.model.compressor.frames_per_cube)
  items = [(os.path.join(root, r["video"]), _question(r)) for r in records]
  answers = answer_batch(model, items, max_new_tokens=max_new_tokens, num_frames=int(d.max_frames),
                         fps=float(d.fps), batch_size=int(d.batch_size), errors="return")
  videos, skipped = [], []
  for r, a in zip(records, answers):
    if a.error is not None:
      skipped.append({"id": r["id"], "error": a.error})
      continue
    vid = r["id"]
    videos.append({"id": vid, "num_frames": a.num_frames, "cuts": truth[vid]["cuts"],
                   "learned": [c.start_frame for c in a.cubes], "uniform": uniform_starts(a.num_frames, fpq),
                   "caption": truth[vid]["caption"], "generated": a.text, "scenes": truth[vid].get("scenes", [])})
  written = []
  if timeline_dir:
    for (video, _), r in list(zip(items, records))[:timelines]:
      out = os.path.join(timeline_dir, r["id"])
      write_timeline(model, video, out, num_frames=int(d.max_frames), fps=float(d.fps), uniform=True)
      written.append(os.path.join(out, "timeline.png"))
  result = {"videos": videos, "scores": {}, "captions": caption_scores(videos), "skipped": skipped,
            "timelines": written}
  for tol in (1, 0):
    for key in ("learned", "uniform"):
      result["scores"][f"{key}_tol{tol}"] = scores(videos, key, tol)
  return result


def caption_scores(videos: list[dict]) -> dict[str, float]:
  """Answer accuracy: exact match with the true caption, and per-scene accuracy ("colour shape" at the
  right position)."""
  def scenes(text):
    return [s.strip().rstrip(".") for s in text.split(", then ")]
  exact = np.mean([v["generated"] == v["caption"] for v in videos]) if videos else 0.0
  per_scene = []
  for v in videos:
    want, got = scenes(v["caption"]), scenes(v["generated"])
    per_scene += [i < len(got) and got[i] == w for i, w in enumerate(want)]
  return {"exact_match": float(exact), "scene_accuracy": float(np.mean(per_scene)) if per_scene else 0.0,
          "videos": len(videos)}
