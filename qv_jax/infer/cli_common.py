"""What qv-ask and qv-timeline share: the checkpoint / video / sampling flags and one-line errors."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from qv_jax.infer.types import Clip


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
  """The command's parser with the shared flags; `doc` (the module docstring) is its help text."""
  p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_common(p)
  return p


def add_common(p: argparse.ArgumentParser) -> None:
  p.add_argument("video", help="a video file")
  p.add_argument("--checkpoint", required=True, help="a qv-convert output or a training work directory")
  p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's, or the config's)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                 help="compute and param dtype (default: the checkpoint config's)")
  p.add_argument("--num-frames", type=int, default=420, help="frames sampled at most (SPEC §1.1; default 420)")
  p.add_argument("--fps", type=float, default=1.0, help="sampling rate before the uniform subsampling")
  p.add_argument("--start", type=float, default=None, help="clip start (seconds)")
  p.add_argument("--end", type=float, default=None, help="clip end (seconds)")


def video_arg(args):
  if args.start is None and args.end is None:
    return args.video
  return Clip(args.video, start_sec=args.start, end_sec=args.end)


def load_model(args):
  from qv_jax.infer.load import load
  return load(args.checkpoint, dtype=args.dtype, tokenizer=args.tokenizer)


def fail(prog: str, error: BaseException) -> int:
  message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  print(f"{prog}: error: {message}", file=sys.stderr)
  return 2


def run_or_fail(prog: str, fn: Callable[[], Any]) -> tuple[Any, int | None]:
  """(fn(), None), or (None, exit status 2) after one `prog: error: ...` line for an expected error."""
  try:
    return fn(), None
  except (*expected_errors(), ValueError) as e:
    return None, fail(prog, e)


def expected_errors():
  from qv_jax.config.errors import ConfigError
  from qv_jax.infer.load import CheckpointLoadError
  from qv_jax.infer.types import QuestionError, VideoError
  return (VideoError, QuestionError, CheckpointLoadError, ConfigError, FileNotFoundError)
