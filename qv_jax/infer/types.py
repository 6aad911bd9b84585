"""The value types of the inference API: what goes in (a video file, a clip of one, pre-sampled frames) and
what comes out (an `Answer` with its cubes)."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence, Union

import numpy as np


class VideoError(ValueError):
  """A video that is missing, unreadable or yields too few frames; the message names it."""


class QuestionError(ValueError):
  """An empty question (or a conversation turn without text)."""


@dataclasses.dataclass(frozen=True)
class Clip:
  """A video file, optionally cut to [start_sec, end_sec] before the 1-fps sampling (SPEC §1.1)."""
  path: str | os.PathLike
  start_sec: float | None = None
  end_sec: float | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Frames:
  """Pre-sampled frames: uint8 [N, H, W, 3] RGB (any size: resized to the model's like sampled video
  frames) with one timestamp in seconds per frame. `name` labels errors and outputs."""
  frames: np.ndarray
  timestamps: Sequence[float]
  name: str = "<frames>"


Video = Union[str, os.PathLike, Clip, Frames]


@dataclasses.dataclass(frozen=True)
class Cube:
  """One cube of the cubing network's partition (η = 0): frames [start_frame, end_frame) of the sampled
  frames, their seconds (start_sec: the first frame's timestamp, end_sec: the last frame's), and the
  boundary probability p = σ((z₁ - z₀)/τ) at start_frame (1.0 for cube 0, whose start is forced)."""
  index: int
  start_frame: int
  end_frame: int
  start_sec: float
  end_sec: float
  boundary_prob: float


@dataclasses.dataclass
class Answer:
  """One generated answer. `text` is post-processed as the reference does (SPEC §9: id-0 tokens dropped,
  a leading BOS and the trailing terminator removed, decoded with special tokens, stripped); `token_ids`
  are the generated ids up to and including the terminator when one was emitted. `prefill_s`: frames on
  the host to the first token (vision tower, cubing, resampler, decoder prefill); `decode_s`: the rest.
  `timings` splits them further (video_s, tower_s, compressor_s, prefill_s, decode_s); `error` is set (and
  text "") only by `answer_batch(errors="return")` for an item that failed."""
  text: str
  token_ids: list[int]
  cubes: list[Cube]
  timestamps: list[float]
  prompt: str
  num_frames: int
  prefill_s: float
  decode_s: float
  error: str | None = None
  boundary_probs: list[float] = dataclasses.field(default_factory=list)
  timings: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def video_name(video: Video) -> str:
  if isinstance(video, Frames):
    return video.name
  if isinstance(video, Clip):
    return os.fspath(video.path)
  return os.fspath(video)
