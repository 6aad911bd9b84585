"""`qv-ask` / `python -m qv_jax.infer.cli_ask`: ask a video a question.

  qv-ask VIDEO "What happens after the goal?" --checkpoint DIR [--stream] [--json]

Prints the answer (greedy unless --temperature > 0). --stream prints tokens as they are generated;
--json prints one JSON object instead: the answer, its token ids, the cubes (frames, seconds, boundary
probability), the timestamps, timings and the exact prompt. Errors are one line on stderr, exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from qv_jax.infer.cli_common import load_model, parser, run_or_fail, video_arg


def parse_args(argv=None):
  p = parser("qv-ask", __doc__)
  p.add_argument("question")
  p.add_argument("--max-new-tokens", type=int, default=2048)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0 samples")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stream", action="store_true", help="print tokens as they come")
  p.add_argument("--json", action="store_true", help="print a JSON object with cubes, timings and prompt")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from qv_jax.infer.api import answer
  on_text = None
  if args.stream and not args.json:
    def on_text(delta):
      sys.stdout.write(delta)
      sys.stdout.flush()
  result, status = run_or_fail("qv-ask", lambda: answer(
      load_model(args), video_arg(args), args.question, max_new_tokens=args.max_new_tokens,
      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
      num_frames=args.num_frames, fps=args.fps, on_text=on_text))
  if status is not None:
    return status
  if args.json:
    out = dataclasses.asdict(result)
    out["video"] = args.video
    out["question"] = args.question
    print(json.dumps(out))
  elif args.stream:
    print()
  else:
    print(result.text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
