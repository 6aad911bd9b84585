"""What the model's compressor keeps of a video at η = 0: `timeline.json` and `timeline.png`.

The picture, top to bottom on one time axis (seconds): a strip of sampled frames at their timestamps;
the cubes as coloured spans labelled with their start time; the boundary probability p of every frame
transition, with the chosen boundaries marked. With `uniform`, the uniform partition (the paper's
baseline: the same number of cubes, equal lengths) is drawn dashed across all panels for comparison.

Each compressor kind shows its own selection: `cubing` its learned cubes, `uniform` its fixed cubes (the
probability panel is then the cubing network's, which that kind ignores), `score_gating` the tokens its
global top-K keeps in every frame (`kept_tokens` in the JSON, bars in the PNG instead of cubes and
probabilities). `question_select` is refused (`TimelineError`): its frames depend on a question.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from qv_jax.infer import inputs, runner
from qv_jax.infer.api import cubes_of
from qv_jax.infer.types import Video, video_name
from qv_jax.model import gumbel
from qv_jax.model.compressors.base import CompressorInputs
from qv_jax.model.compressors.registry import compressor_kind


def uniform_starts(num_frames: int, frames_per_cube: int) -> list[int]:
  """The compressor's uniform partition: cube j starts at floor(j·N / (k+1))."""
  cubes = gumbel.num_cubes(int(num_frames), int(frames_per_cube))
  return [(j * int(num_frames)) // cubes for j in range(cubes)]


class TimelineError(ValueError):
  """A compressor kind whose selection a video alone does not determine."""


@partial(jax.jit, static_argnames=("graphdef",))
def _kept_tokens(graphdef, state, frames, num_frames):
  model = nnx.merge(graphdef, state)
  out = model.compressor.encode(CompressorInputs(features=model.frame_features(frames), num_frames=num_frames))
  return out.token_mask.sum(-1)


def kept_tokens(model, frames: np.ndarray) -> tuple[list[int], int]:
  """score_gating: (tokens kept in each of the N frames by the global top-K, K) for frames uint8
  [N, S, S, 3], padded to its frame bucket."""
  n = len(frames)
  f = runner.frame_bucket(n, tuple(model.config.data.frame_buckets))
  padded = np.zeros((1, f) + frames.shape[1:], np.uint8)
  padded[0, :n] = frames
  with model.context():
    kept = _kept_tokens(model.graphdef, model.state, runner._put(model, padded),
                        runner._put(model, np.asarray([n], np.int32)))
  c = model.config.model.compressor
  from qv_jax.model.compressors.score_gating import budget_tokens
  return [int(k) for k in np.asarray(kept)[0, :n]], budget_tokens(f, int(c.num_queries), float(c.keep_ratio))


def compute_timeline(model, video: Video, *, num_frames: int | None = 420, fps: float = 1.0
                     ) -> tuple[dict, np.ndarray]:
  """(the timeline dict written to timeline.json, the sampled frames uint8 [N, S, S, 3]). Raises
  TimelineError for `question_select`."""
  kind = compressor_kind(model.config.model.compressor)
  if kind == "question_select":
    raise TimelineError("model.compressor.kind=question_select picks frames by a question's attention, so a "
                        "video alone has no selection to draw (its answers list the kept frames as cubes)")
  frames, timestamps = inputs.read_frames(video, image_size=int(model.config.data.image_size),
                                          num_frames=num_frames, fps=fps)
  n = len(timestamps)
  head = {"video": video_name(video), "kind": kind, "num_frames": n, "timestamps": [float(t) for t in timestamps]}
  if kind == "score_gating":
    kept, budget = kept_tokens(model, frames)
    return {**head, "budget_tokens": budget, "tokens_per_frame": int(model.config.model.compressor.num_queries),
            "kept_tokens": kept}, frames
  boundary, probs = runner.cube_boundaries(model, frames)
  fpq = int(model.config.model.compressor.frames_per_cube)
  cubes = cubes_of(boundary, probs, timestamps)
  return {
      **head,
      "frames_per_cube": fpq,
      "k": gumbel.num_cubes(n, fpq) - 1,
      "num_cubes": len(cubes),
      "cubes": [dataclasses.asdict(c) for c in cubes],
      "boundary_probs": [float(p) for p in probs[:n - 1]],
      "uniform_starts": uniform_starts(n, fpq),
  }, frames


def _edges(timestamps: Sequence[float]) -> np.ndarray:
  """Time edges of each sampled frame's slot: midpoints between timestamps, half a step beyond the ends."""
  t = np.asarray(timestamps, np.float64)
  step = float(np.median(np.diff(t))) if len(t) > 1 else 1.0
  mids = (t[1:] + t[:-1]) / 2
  return np.concatenate([[t[0] - step / 2], mids, [t[-1] + step / 2]])


def _frame_strip(ax, frames, ts, edges, max_thumbnails: int) -> None:
  """Evenly spaced thumbnails, each centred on its timestamp."""
  n = len(ts)
  shown = np.unique(np.linspace(0, n - 1, min(n, max_thumbnails)).round().astype(int))
  slot = (edges[-1] - edges[0]) / max(len(shown), 1)
  for i in shown:
    c = ts[i]
    ax.imshow(frames[i], extent=(c - slot * 0.46, c + slot * 0.46, 0, 1), aspect="auto", zorder=2)
    ax.plot([c, c], [-0.08, 0], color="black", lw=0.8, clip_on=False)
  ax.set_ylim(-0.08, 1)
  ax.set_yticks([])
  ax.set_ylabel("frames", fontsize=9)


def _draw_kept_tokens(timeline: dict, frames: np.ndarray, path: str, max_thumbnails: int) -> str:
  """score_gating: the frame strip over the tokens the top-K keeps in each frame."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ts = timeline["timestamps"]
  edges = _edges(ts)
  fig, (ax_f, ax_k) = plt.subplots(2, 1, figsize=(float(np.clip(0.06 * len(ts) + 8, 10, 22)), 4.4), sharex=True,
                                   gridspec_kw=dict(height_ratios=[1.3, 1.4], hspace=0.08))
  _frame_strip(ax_f, frames, ts, edges, max_thumbnails)
  kept = timeline["kept_tokens"]
  ax_f.set_title(f"{os.path.basename(timeline['video'])}: {len(ts)} sampled frames → {sum(kept)} tokens kept "
                 f"(global top-K, K = {timeline['budget_tokens']}, score_gating)", loc="left", fontsize=10)
  ax_k.bar(ts, kept, width=0.8 * np.diff(edges), color="tab:green")
  ax_k.set_ylim(0, timeline["tokens_per_frame"] + 0.5)
  ax_k.set_ylabel("kept tokens", fontsize=9)
  ax_k.set_xlabel("time (s)")
  ax_k.grid(alpha=0.3)
  ax_k.set_xlim(edges[0], edges[-1])
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def draw_timeline(timeline: dict, frames: np.ndarray, path: str, *, uniform: bool = False,
                  max_thumbnails: int = 24) -> str:
  """Writes the PNG described in the module docstring to `path`."""
  if "kept_tokens" in timeline:
    return _draw_kept_tokens(timeline, frames, path, max_thumbnails)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ts = timeline["timestamps"]
  n = len(ts)
  edges = _edges(ts)
  t0, t1 = edges[0], edges[-1]
  width = float(np.clip(0.06 * n + 8, 10, 22))
  fig, (ax_f, ax_c, ax_p) = plt.subplots(3, 1, figsize=(width, 5.6), sharex=True,
                                         gridspec_kw=dict(height_ratios=[1.3, 1.0, 1.4], hspace=0.08))
  _frame_strip(ax_f, frames, ts, edges, max_thumbnails)
  chooser = ("placed evenly (uniform kind)" if timeline.get("kind") == "uniform"
             else "chosen by the cubing network")
  ax_f.set_title(f"{os.path.basename(timeline['video'])}: {n} sampled frames → {timeline['num_cubes']} cubes "
                 f"(k = {timeline['k']} boundaries {chooser}, η = 0)", loc="left", fontsize=10)

  # cubes
  colours = plt.get_cmap("tab20")
  for c in timeline["cubes"]:
    a, b = edges[c["start_frame"]], edges[c["end_frame"]]
    ax_c.axvspan(a, b, ymin=0.08, ymax=0.92, color=colours(c["index"] % 20), alpha=0.85, lw=0)
    ax_c.axvline(a, color="black", lw=1.2)
    if (b - a) > (t1 - t0) / 70 or len(timeline["cubes"]) <= 30:
      ax_c.text(a + (t1 - t0) / 400, 0.5, f"{c['start_sec']:g}s", rotation=90, va="center", ha="left",
                fontsize=7 if len(timeline["cubes"]) > 20 else 9)
  ax_c.set_yticks([])
  ax_c.set_ylim(0, 1)
  ax_c.set_ylabel("cubes", fontsize=9)

  # boundary probability of each transition t-1 -> t, drawn at the edge between the two frames
  probs = np.asarray(timeline["boundary_probs"])
  x = edges[1:n]
  ax_p.plot(x, probs, color="tab:blue", lw=1.2, marker="o" if n <= 60 else None, ms=3,
            label="boundary probability p")
  chosen = [c["start_frame"] for c in timeline["cubes"][1:]]
  ax_p.scatter(edges[chosen], probs[np.asarray(chosen, int) - 1] if chosen else [], color="black", zorder=3,
               s=18, label="chosen boundary")
  for f in chosen:
    ax_p.axvline(edges[f], color="black", lw=0.8, alpha=0.6, zorder=1)
  ax_p.set_ylim(-0.03, 1.05)
  ax_p.set_ylabel("p(boundary)", fontsize=9)
  ax_p.set_xlabel("time (s)")
  ax_p.grid(alpha=0.3)

  if uniform:
    for j, s in enumerate(timeline["uniform_starts"][1:]):
      for ax in (ax_f, ax_c, ax_p):
        ax.axvline(edges[s], color="dimgray", ls="--", lw=1.0, zorder=4,
                   label="uniform partition" if (ax is ax_p and j == 0) else None)
  ax_p.legend(loc="upper center", bbox_to_anchor=(0.5, -0.32), fontsize=8, ncol=3, frameon=False)
  ax_p.set_xlim(t0, t1)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def write_timeline(model, video: Video, out_dir: str, *, num_frames: int | None = 420, fps: float = 1.0,
                   uniform: bool = False) -> dict:
  """Computes the timeline of `video` and writes out_dir/timeline.json and out_dir/timeline.png."""
  os.makedirs(out_dir, exist_ok=True)
  timeline, frames = compute_timeline(model, video, num_frames=num_frames, fps=fps)
  with open(os.path.join(out_dir, "timeline.json"), "w") as f:
    json.dump(timeline, f, indent=1)
  draw_timeline(timeline, frames, os.path.join(out_dir, "timeline.png"), uniform=uniform)
  return timeline
