"""A tiny random Quicksviewer saved as a training work directory, with its tokenizer, and a scene video:
shared by the inference tests."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from configs.quicksviewer import get_config
from data_pipeline import synthetic
from data_pipeline.tokenizer import build_tiny_tokenizer
from qv_jax.config import validate
from qv_jax.model.quicksviewer import Quicksviewer

TEXTS = [synthetic.QUESTION, "What colour is the first shape?", "user assistant system", "0123456789.",
         " ".join(synthetic.COLOURS), " ".join(synthetic.SHAPES), "red circle, then blue square."]


def make_workdir(directory: str, *, size: str = "tiny", seed: int = 0, step: int = 3) -> str:
  """directory/{config.json, tokenizer.json, checkpoints/<step>/params}: random weights of `size`."""
  os.makedirs(directory, exist_ok=True)
  tokenizer = build_tiny_tokenizer(TEXTS, os.path.join(directory, "tokenizer.json"), "qwen2", vocab_size=300)
  config = get_config(f"size={size},stage=3")
  config.data.tokenizer_path = tokenizer
  config.data.max_text_len, config.data.max_seq_len = 256, 256
  config.train.seed = seed
  validate(config)
  model = Quicksviewer(config, rngs=nnx.Rngs(params=seed))
  params = nnx.to_pure_dict(nnx.state(model))
  with ocp.StandardCheckpointer() as ck:
    ck.save(os.path.abspath(os.path.join(directory, "checkpoints", str(step), "params")), params)
  with open(os.path.join(directory, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return directory


def make_video(path: str, *, seconds: int = 14, seed: int = 0) -> tuple[str, synthetic.SceneVideo]:
  """A procedural scene video (4 fps, 112 px) of `seconds` seconds."""
  video = synthetic.random_video(np.random.default_rng(seed), os.path.basename(path), min_seconds=seconds,
                                 max_seconds=seconds)
  synthetic.encode_video(video, path)
  return path, video


def one_device_mesh():
  from qv_jax.sharding import make_mesh
  return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
