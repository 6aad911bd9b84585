"""Random-weight checkpoints and scene videos for tests and benchmarks: a Quicksviewer of a named size
saved as a training work directory (config.json, tokenizer.json, checkpoints/<step>/params)."""

from __future__ import annotations

import os

import numpy as np

TEXTS_EXTRA = ["What colour is the first shape?", "red circle, then blue square."]


def make_workdir(directory: str, *, size: str = "tiny", seed: int = 0, step: int = 3,
                 max_text_len: int = 256, max_seq_len: int = 256, compressor: dict | None = None) -> str:
  """Writes a random `size` model (stage-3 config, a tiny BPE tokenizer) to `directory`; returns it.
  `compressor`: overrides of `model.compressor` (e.g. {"kind": "score_gating"})."""
  import orbax.checkpoint as ocp
  from flax import nnx

  from qv_jax.config.presets import get_config
  from data_pipeline import synthetic
  from data_pipeline.tokenizer import build_tiny_tokenizer
  from qv_jax.config import validate
  from qv_jax.model.quicksviewer import Quicksviewer

  os.makedirs(directory, exist_ok=True)
  texts = [synthetic.QUESTION, "user assistant system", "0123456789.", " ".join(synthetic.COLOURS),
           " ".join(synthetic.SHAPES)] + TEXTS_EXTRA
  tokenizer = build_tiny_tokenizer(texts, os.path.join(directory, "tokenizer.json"), "qwen2", vocab_size=300)
  config = get_config(f"size={size},stage=3")
  config.data.tokenizer_path = tokenizer
  config.data.max_text_len, config.data.max_seq_len = max_text_len, max_seq_len
  config.train.seed = seed
  for k, v in (compressor or {}).items():
    config.model.compressor[k] = v
  config = validate(config)
  params = nnx.to_pure_dict(nnx.state(Quicksviewer(config.model, max_seq_len=config.data.max_seq_len,
                                                   rngs=nnx.Rngs(params=seed))))
  with ocp.StandardCheckpointer() as ck:
    ck.save(os.path.abspath(os.path.join(directory, "checkpoints", str(step), "params")), params)
  with open(os.path.join(directory, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))
  return directory


def make_video(path: str, *, seconds: int = 14, seed: int = 0, fps: int = 4, size: int = 112):
  """A procedural scene video (`data_pipeline.synthetic`); returns (path, SceneVideo)."""
  from data_pipeline import synthetic
  video = synthetic.random_video(np.random.default_rng(seed), os.path.basename(path), min_seconds=seconds,
                                 max_seconds=seconds)
  synthetic.encode_video(video, path, fps=fps, size=size)
  return path, video
