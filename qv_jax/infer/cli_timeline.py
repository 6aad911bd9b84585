"""`qv-timeline` / `python -m qv_jax.infer.cli_timeline`: where the cubes fall in a video.

  qv-timeline VIDEO --checkpoint DIR --out DIR [--uniform]

Runs the vision tower and the compressor at η = 0 (no decoder) and writes OUT/timeline.json (cubes
with frames, seconds and boundary probabilities; k = max(round(N/5) - 1, 1); every transition's
probability; the uniform partition's starts) and OUT/timeline.png (frames along a time axis, each cube a
coloured span labelled with its start time, the boundary probability curve under it; with --uniform the
uniform partition dashed for comparison). A `score_gating` model shows the tokens its top-K keeps in each
frame instead of cubes; a `question_select` model is refused (its frames depend on a question). Errors are
one line on stderr, exit code 2.
"""

from __future__ import annotations

import json
import os
import sys

from qv_jax.infer.cli_common import load_model, parser, run_or_fail, video_arg


def parse_args(argv=None):
  p = parser("qv-timeline", __doc__)
  p.add_argument("--out", required=True, help="output directory (timeline.json, timeline.png)")
  p.add_argument("--uniform", action="store_true", help="draw the uniform partition dashed for comparison")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from qv_jax.infer.timeline import write_timeline
  timeline, status = run_or_fail("qv-timeline", lambda: write_timeline(
      load_model(args), video_arg(args), args.out, num_frames=args.num_frames, fps=args.fps, uniform=args.uniform))
  if status is not None:
    return status
  summary = {"out": os.path.abspath(args.out), "kind": timeline["kind"], "num_frames": timeline["num_frames"]}
  if "kept_tokens" in timeline:
    summary.update(kept_tokens=timeline["kept_tokens"], budget_tokens=timeline["budget_tokens"])
  else:
    summary.update(num_cubes=timeline["num_cubes"], cube_starts_sec=[c["start_sec"] for c in timeline["cubes"]])
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
