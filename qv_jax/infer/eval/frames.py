"""Reading a benchmark item's video into what the inference API takes (a Clip or decoded Frames)."""

import os

import numpy as np

from data_pipeline.video import frame_timestamps, sample_frame_indices
from qv_jax.infer.eval.items import FrameFolder, VideoFile


class MissingVideo(Exception):
  """The item's video file or frame folder does not exist."""


class UnreadableVideo(Exception):
  """The item's video exists but yields no frames."""


def _frame_name(index: int) -> str:
  return f"{index:05d}.jpg"


def reference_folder_indices(count: int, num_frames: int, fps: float, start, end) -> list[int]:
  """The reference's `read_frame` indices (1-based, SPEC §10): `num_frames` segment midpoints between
  max(1, round(start*fps)) and min(round(end*fps), count); duplicates kept, as it keeps them."""
  lo, hi = (-100000, 100000) if start is None else (start, end)
  first, last = max(1, round(lo * fps)), min(round(hi * fps), count)
  seg = float(last - first) / num_frames
  return [int(first + seg / 2 + np.round(seg * k)) for k in range(num_frames)]


def folder_frames(folder: FrameFolder, num_frames: int, fps: float) -> tuple[np.ndarray, list[float]]:
  """uint8 [N, H, W, 3] frames of a frame folder and their timestamps (seconds).

  Standard: the §1.1 one-frame-per-second sampling applied to the folder's real rate (`folder.fps`), within
  start/end when given; frame i (0-based) is file i+1. Reference: `reference_folder_indices` at `ref_fps`."""
  from PIL import Image
  if not os.path.isdir(folder.path):
    raise MissingVideo(f"{folder.path}: frame folder not found")
  count = len(os.listdir(folder.path))
  if folder.reference:
    numbers = reference_folder_indices(count, num_frames, folder.ref_fps, folder.start_sec, folder.end_sec)
    times = [round(i / folder.ref_fps, 2) for i in numbers]
  else:
    zero_based = sample_frame_indices(folder.fps, count, num_frames, fps, folder.start_sec, folder.end_sec)
    numbers, times = [i + 1 for i in zero_based], frame_timestamps(zero_based, folder.fps)
  frames, stamps = [], []
  for number, t in zip(numbers, times):
    path = os.path.join(folder.path, _frame_name(number))
    if not os.path.isfile(path):
      continue
    try:
      with Image.open(path) as im:
        frames.append(np.asarray(im.convert("RGB")))
    except OSError as e:
      raise UnreadableVideo(f"{path}: unreadable frame ({e})") from None
    stamps.append(t)
  if not frames:
    raise UnreadableVideo(f"{folder.path}: no frames {_frame_name(numbers[0]) if numbers else ''}... in the folder")
  if len({f.shape for f in frames}) > 1:
    raise UnreadableVideo(f"{folder.path}: frames of different sizes")
  return np.stack(frames), stamps


def to_api_video(video: VideoFile | FrameFolder, num_frames: int, fps: float):
  """A `qv_jax.infer.Clip` for a file (start/end passed on), `Frames` for a frame folder."""
  from qv_jax.infer import Clip, Frames
  if isinstance(video, FrameFolder):
    frames, stamps = folder_frames(video, num_frames, fps)
    return Frames(frames, stamps, name=video.path)
  if not os.path.isfile(video.path):
    raise MissingVideo(f"{video.path}: video not found")
  return Clip(video.path, start_sec=video.start_sec, end_sec=video.end_sec)
