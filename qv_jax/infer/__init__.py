"""Inference: load a converted checkpoint or a training work directory and ask videos questions.

  from qv_jax.infer import load, answer
  model = load("ckpt/")
  print(answer(model, "video.mp4", "What happens?").text)
"""

from qv_jax.infer.api import Conversation, answer, answer_batch, postprocess
from qv_jax.infer.load import CheckpointLoadError, Model, load
from qv_jax.infer.types import Answer, Clip, Cube, Frames, QuestionError, Video, VideoError

__all__ = ["Answer", "CheckpointLoadError", "Clip", "Conversation", "Cube", "Frames", "Model", "QuestionError",
           "Video", "VideoError", "answer", "answer_batch", "load", "postprocess"]
