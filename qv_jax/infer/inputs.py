"""From a video and a question to one padded-ready sample, through the training path's own code: the
reference's 1-fps frame sampling (`data_pipeline.video.read_video`, SPEC §1.1), the prompt and its tokens
(`data_pipeline.prompt`, SPEC §1.5-§1.7)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from data_pipeline.errors import BadSampleError
from data_pipeline.preprocess import resize_frames
from data_pipeline.prompt import expand_conversation, render_conversation, tokenize_sample
from data_pipeline.video import read_video
from qv_jax.batch import MODALITY_VIDEO
from qv_jax.infer.types import Clip, Frames, QuestionError, Video, VideoError, video_name


def read_frames(video: Video, *, image_size: int, num_frames: int | None = 420, fps: float = 1.0,
                min_frames: int = 2) -> tuple[np.ndarray, list[float]]:
  """uint8 [N, image_size, image_size, 3] RGB frames and their timestamps (seconds). A file (or Clip) is
  sampled as the reference does (SPEC §1.1; fewer than 2 frames: once more at fps + 1, the training
  guard, where the reference's CLI would crash); `Frames` are used as given (resized). Raises VideoError
  naming the video."""
  name = video_name(video)
  if isinstance(video, Frames):
    frames = np.asarray(video.frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
      raise VideoError(f"{name}: expected uint8 frames [N, H, W, 3], got {frames.dtype} {frames.shape}")
    if len(video.timestamps) != len(frames):
      raise VideoError(f"{name}: {len(frames)} frames but {len(video.timestamps)} timestamps")
    if len(frames) < min_frames:
      raise VideoError(f"{name}: {len(frames)} frame(s); cubing needs at least {min_frames}")
    return resize_frames(frames, image_size), [float(t) for t in video.timestamps]
  clip = video if isinstance(video, Clip) else Clip(video)
  path = os.fspath(clip.path)
  if not os.path.exists(path):
    raise VideoError(f"{path}: no such video file")
  if os.path.isdir(path):
    raise VideoError(f"{path}: is a directory, not a video file (pass Frames for a frame folder)")
  try:
    out = read_video(path, num_frames=num_frames, fps=fps, image_size=image_size, min_frames=min_frames,
                     start_sec=clip.start_sec, end_sec=clip.end_sec)
  except BadSampleError as e:
    message = str(e).splitlines()[0].removeprefix(f"{e.source}: " if e.source else "")
    raise VideoError(f"{path}: unreadable video: {message}") from None
  except (OSError, ValueError) as e:
    raise VideoError(f"{path}: unreadable video ({type(e).__name__}: {e})") from None
  return out.frames, list(out.timestamps)


def conversation(question: str, history: Sequence[tuple[str, str]] = ()) -> list[dict]:
  """LLaVA-style turns: the earlier (question, answer) rounds re-sent, the new question, and an empty
  assistant turn (the generation prompt). The video's `<image>` goes into the first question."""
  turns = []
  for i, (q, a) in enumerate(list(history) + [(question, "")]):
    if not isinstance(q, str) or not q.strip():
      raise QuestionError(f"question {i + 1} of the conversation is empty" if history else
                          "the question is empty")
    turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  return turns


def prompt_text(turns: list[dict], timestamps: Sequence[float], template: str) -> str:
  """The exact prompt string the model sees (placeholders as `<image>`)."""
  return render_conversation(expand_conversation(turns, modality="video", timestamps=list(timestamps)),
                             template)


def make_sample(frames: np.ndarray, timestamps: Sequence[float], turns: list[dict], *, tokenizer,
                template: str, sample_id: int = 0) -> dict:
  """One sample in the collator's format (`data_pipeline.collate`): frames, timestamps, modality and the
  pre-merge input_ids / labels / token_frame of `tokenize_sample`."""
  try:
    tokens = tokenize_sample(turns, modality="video", tokenizer=tokenizer, template=template,
                             timestamps=list(timestamps))
  except BadSampleError as e:
    raise QuestionError(f"cannot build the prompt: {e}") from None
  return dict(tokens, frames=frames, timestamps=np.asarray(timestamps, np.float32), modality=MODALITY_VIDEO,
              sample_id=sample_id)
