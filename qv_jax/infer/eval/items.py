"""What a benchmark reader yields: one multiple-choice question about one video (file or frame folder)."""

import dataclasses
from typing import Any


class BenchmarkError(ValueError):
  """A benchmark directory or index file is missing or malformed; the message is one line naming it."""


@dataclasses.dataclass(frozen=True)
class FrameFolder:
  """A folder of 1-based `00001.jpg` frames extracted at `fps` (MVBench's TVQA frames: 3 fps).
  `reference=True` reads them as the reference's `read_frame` does (SPEC §10): `ref_fps` as the rate, `num_frames`
  segment midpoints (duplicates kept), timestamps round(i / ref_fps, 2)."""
  path: str
  fps: float = 3.0
  start_sec: float | None = None
  end_sec: float | None = None
  reference: bool = False
  ref_fps: float = 1.0


@dataclasses.dataclass(frozen=True)
class VideoFile:
  """A video file, optionally bounded to [start_sec, end_sec] (MVBench's start/end)."""
  path: str
  start_sec: float | None = None
  end_sec: float | None = None


@dataclasses.dataclass(frozen=True)
class Item:
  """One question. `key` is unique within the benchmark and stable across runs (it keys resume).
  `question` is the full prompt text the reference sends; `options` the bare option texts (no "A." labels);
  `answer` the correct letter. `variant` is "standard", or "reference" for an extra run with the reference's
  inputs (MVBench bounded tasks: start/end ignored), which only the reference metrics read; `meta` carries
  per-benchmark fields (Video-MME duration, task_type)."""
  key: str
  task: str
  video: VideoFile | FrameFolder
  question: str
  options: tuple[str, ...]
  answer: str
  variant: str = "standard"
  meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass
class ReadResult:
  """Items plus the samples skipped as malformed (key -> one-line reason)."""
  items: list[Item]
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)
