"""Evaluation of a trained model on a held-out split: the learned partition (η = 0) and the uniform one
against known scene cuts, and greedy captions. Used by the CPU demo (`launch/demo.py`).

Boundary scores count the inner boundaries (frame 0 always starts a cube and is left out): a predicted
boundary matches a true cut within ±`tolerance` frames, each cut matching at most one prediction;
precision = matches / predictions, recall = matches / cuts.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qv_jax.batch import IGNORE_INDEX
from qv_jax.model import gumbel
from qv_jax.sharding import axis_rules, make_mesh
from qv_jax.train import checkpoint as ckpt
from qv_jax.train.state import model_factory


def load_model(config, workdir: str, devices=None):
  """The Quicksviewer of `config` with the params of the latest checkpoint under `workdir`, replicated over
  `devices` (default: the first device)."""
  devices = devices or [jax.devices()[0]]
  mesh = make_mesh({"data": len(devices), "fsdp": 1, "tensor": 1}, devices)
  with jax.set_mesh(mesh), axis_rules(config.sharding_rules):
    graphdef, abstract = nnx.split(nnx.eval_shape(model_factory(config)))
    from qv_jax.sharding import state_shardings
    from qv_jax.train.state import abstract_like
    target = abstract_like(nnx.to_pure_dict(abstract), nnx.to_pure_dict(state_shardings(abstract, mesh)))
    params = ckpt.load_params(workdir, target, config.model.size)
  return nnx.merge(graphdef, params)


def boundary_matches(predicted, true, tolerance: int = 1) -> int:
  """Matched inner boundaries (greedy, nearest first, each cut used once)."""
  unused = sorted(true)
  tp = 0
  for p in sorted(predicted):
    best = min(unused, key=lambda c: abs(c - p), default=None)
    if best is not None and abs(best - p) <= tolerance:
      tp += 1
      unused.remove(best)
  return tp


def uniform_starts(num_frames: int, frames_per_cube: int) -> list[int]:
  """The compressor's uniform partition: cube j starts at floor(j·N / (k+1))."""
  k = gumbel.num_cubes(num_frames, frames_per_cube) - 1
  return [(j * num_frames) // (k + 1) for j in range(k + 1)]


def _prompt_only(batch: dict) -> dict:
  """Cuts every row before its first supervised label (the answer), keeping the prompt."""
  labels = batch["labels"]
  supervised = labels != IGNORE_INDEX
  first = np.where(supervised.any(1), supervised.argmax(1), labels.shape[1])
  keep = np.arange(labels.shape[1])[None, :] < first[:, None]
  out = dict(batch)
  out["token_valid"] = batch["token_valid"] & keep
  out["labels"] = np.full_like(labels, IGNORE_INDEX)
  return out


def scores(videos: list[dict], key: str, tolerance: int) -> dict[str, float]:
  tp = sum(boundary_matches(v[key][1:], v["cuts"], tolerance) for v in videos)
  pred = sum(len(v[key]) - 1 for v in videos)
  true = sum(len(v["cuts"]) for v in videos)
  precision = tp / pred if pred else 0.0
  recall = tp / true if true else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1, "matched": tp, "predicted": pred, "true": true}


def evaluate(config, workdir: str, jsonl: str, truth: dict[str, Any], *, tokenizer=None,
             max_new_tokens: int = 32, split: str = "validation") -> dict:
  """Runs the held-out split once. `truth`: {video id: {"cuts": [...], "caption": str}}; the split's
  sample_id is the jsonl line. Returns {"videos": [...], "scores": {...}, "captions": {...}}."""
  from data_pipeline.loader import make_dataset
  from data_pipeline.tokenizer import eos_token_id, load_tokenizer, pad_token_id
  from qv_jax.model.generate import generate

  ids = [json.loads(line)["id"] for line in open(jsonl)]
  tokenizer = tokenizer or load_tokenizer(config.data.tokenizer_path, config.data.template)
  eos, pad = eos_token_id(tokenizer), pad_token_id(tokenizer)
  model = load_model(config, workdir)
  graphdef, state = nnx.split(model)
  fpq = int(config.model.compressor.frames_per_cube)
  eval_config = config.copy_and_resolve_references()
  eval_config.data.drop_remainder = False
  eval_config.data.num_workers = 0

  @jax.jit
  def prepare(state, batch):
    m = nnx.merge(graphdef, state)
    merged, cubes = m.prepare_inputs(batch, key=None, noise_weight=0.0, encode_images=False)
    return merged.embeds, merged.mask, merged.positions, cubes.boundary

  videos = []
  loader = make_dataset(eval_config, split=split, num_epochs=1, shuffle=False)
  for batch in loader:
    batch = _prompt_only(batch)
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    embeds, mask, positions, boundary = prepare(state, device_batch)
    tokens = np.asarray(generate(model.decoder, inputs_embeds=embeds, mask=mask, positions=positions,
                                 max_new_tokens=max_new_tokens, eos_id=eos, pad_id=pad))
    boundary = np.asarray(boundary)
    for row in range(len(batch["sample_id"])):
      vid = ids[int(batch["sample_id"][row])]
      n = int(batch["num_frames"][row])
      text = tokenizer.decode([t for t in tokens[row].tolist() if t not in (eos, pad)], skip_special_tokens=True)
      videos.append({"id": vid, "num_frames": n, "cuts": truth[vid]["cuts"],
                     "learned": [int(f) for f in np.nonzero(boundary[row, :n] > 0.5)[0]],
                     "uniform": uniform_starts(n, fpq), "caption": truth[vid]["caption"],
                     "generated": text.strip(), "scenes": truth[vid].get("scenes", [])})
  result = {"videos": videos, "scores": {}, "captions": caption_scores(videos)}
  for tol in (1, 0):
    for key in ("learned", "uniform"):
      result["scores"][f"{key}_tol{tol}"] = scores(videos, key, tol)
  return result


def caption_scores(videos: list[dict]) -> dict[str, float]:
  """Exact caption match and per-scene accuracy ("colour shape" at the right position)."""
  def scenes(text):
    return [s.strip().rstrip(".") for s in text.split(", then ")]
  exact = np.mean([v["generated"] == v["caption"] for v in videos]) if videos else 0.0
  per_scene = []
  for v in videos:
    want, got = scenes(v["caption"]), scenes(v["generated"])
    per_scene += [i < len(got) and got[i] == w for i, w in enumerate(want)]
  return {"exact_match": float(exact), "scene_accuracy": float(np.mean(per_scene)) if per_scene else 0.0,
          "videos": len(videos)}
