"""A deterministic stand-in for the model: it really reads each item's video (so bounds, frame folders and
missing files matter) and answers the correct letter when it got an even number of frames, else a wrong one."""

import collections
import os

from data_pipeline.errors import BadSampleError
from data_pipeline.video import read_video
from qv_jax.infer.eval.frames import MissingVideo, folder_frames
from qv_jax.infer.eval.harness import MISSING, UNREADABLE, Outcome
from qv_jax.infer.eval.items import FrameFolder


def frame_count(video, num_frames=420, fps=1.0) -> int:
  if isinstance(video, FrameFolder):
    return len(folder_frames(video, num_frames, fps)[0])
  if not os.path.isfile(video.path):
    raise MissingVideo(f"{video.path}: video not found")
  clip = read_video(video.path, num_frames=num_frames, fps=fps, resize=False, start_sec=video.start_sec,
                    end_sec=video.end_sec)
  return len(clip.frames)


class FakeModel:
  """`fail_on_call=k`: the k-th batch raises KeyboardInterrupt (a kill) before answering."""

  def __init__(self, fail_on_call=None):
    self.answered = collections.Counter()
    self.calls = 0
    self.fail_on_call = fail_on_call

  def __call__(self, items):
    self.calls += 1
    if self.calls == self.fail_on_call:
      raise KeyboardInterrupt
    out = []
    for it in items:
      self.answered[it.key] += 1
      try:
        n = frame_count(it.video)
      except MissingVideo as e:
        out.append(Outcome(error=f"{it.key}: {e}", kind=MISSING))
        continue
      except BadSampleError as e:
        out.append(Outcome(error=f"{it.key}: {e}", kind=UNREADABLE))
        continue
      wrong = "ABCDEFGHIJ"[(ord(it.answer) - ord("A") + 1) % len(it.options)]
      out.append(Outcome(text=f"The answer is ({it.answer if n % 2 == 0 else wrong}).", num_frames=n))
    return out
