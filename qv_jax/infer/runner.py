"""The jitted inference pieces and their static buckets: the vision tower, then cubing + resampler + the
training path's sequence assembly (`Quicksviewer.prepare_inputs`, η = 0), then the decoder's prefill and
decode (`qv_jax.model.generate.Generator`).

Static shapes per call: the batch B (a multiple of the mesh's data size), the frame bucket F (the
config's `data.frame_buckets`, or the frame count rounded up to FRAME_MULTIPLE beyond them), the pre-merge
text bucket L (`data.max_text_len`, or rounded up to TEXT_MULTIPLE), and the merged length: assembled at
its bound L + thumbnail + Kmax·Q, then cut to the longest real sequence rounded up to SEQ_MULTIPLE before
the prefill. Questions that land in the same buckets compile nothing.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from data_pipeline.collate import Collator
from qv_jax.model import gumbel
from qv_jax.model.compressors.registry import visual_token_bound
from qv_jax.model.generate import Generator
from qv_jax.sharding import data_sharding

FRAME_MULTIPLE = 32
TEXT_MULTIPLE = 512
SEQ_MULTIPLE = 256


def _round_up(x: int, m: int) -> int:
  return -(-int(x) // m) * m


def frame_bucket(num_frames: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if num_frames <= b:
      return int(b)
  return _round_up(num_frames, FRAME_MULTIPLE)


def text_bucket(num_tokens: int, max_text_len: int) -> int:
  return int(max_text_len) if num_tokens <= max_text_len else _round_up(num_tokens, TEXT_MULTIPLE)


@dataclasses.dataclass
class Prepared:
  """Host copies of what the answers report, plus the decoder inputs (device arrays)."""
  embeds: jax.Array          # [B, S, D]
  mask: jax.Array            # [B, S]
  positions: jax.Array       # [B, S]
  length: np.ndarray         # [B] merged lengths
  boundary: np.ndarray       # [B, F] 1.0 where a cube starts
  probs: np.ndarray          # [B, F-1] boundary probability at η = 0
  timings: dict


@partial(jax.jit, static_argnames=("graphdef",))
def _encode(graphdef, state, frames):
  return nnx.merge(graphdef, state).frame_features(frames)


@partial(jax.jit, static_argnames=("graphdef", "max_seq_len"))
def _compress(graphdef, state, features, batch, max_seq_len, layer_params=None):
  model = nnx.merge(graphdef, state)
  merged, cubes = model.prepare_inputs(batch, key=None, noise_weight=0.0, encode_images=False,
                                       features=features, max_seq_len=max_seq_len, layer_params=layer_params)
  tau = model.compressor.settings.gumbel_tau
  probs = gumbel.boundary_probs(cubes.logits, None, 0.0, tau)
  return merged.embeds, merged.mask, merged.positions, merged.length, cubes.boundary, probs


def _put(model, x: np.ndarray):
  b = x.shape[0]
  if b % model.data_size == 0:
    sharding = data_sharding(model.mesh, x.ndim, model.rules)
  else:
    sharding = NamedSharding(model.mesh, PartitionSpec())
  return jax.device_put(x, sharding)


def collate(model, samples: list[dict]) -> dict:
  """Pads samples (inputs.make_sample) into one batch with the training collator."""
  d = model.config.data
  frames = max(len(s["frames"]) for s in samples)
  tokens = max(len(s["input_ids"]) for s in samples)
  collator = Collator(image_size=int(d.image_size), max_text_len=text_bucket(tokens, d.max_text_len),
                      frame_buckets=(frame_bucket(frames, tuple(d.frame_buckets)),), pad_id=model.pad_id,
                      normalize_on_host=False)
  return collator(samples)


def prepare(model, batch: dict) -> Prepared:
  """Tower, then compressor + assembly, timed apart; the merged sequence cut to its length bucket."""
  timings = {}
  with model.context():
    t0 = time.perf_counter()
    device = {k: _put(model, np.asarray(v)) for k, v in batch.items()}
    features = jax.block_until_ready(_encode(model.graphdef, model.state, device["frames"]))
    timings["tower_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    del device["frames"]
    f = features.shape[1]
    bound = batch["input_ids"].shape[1] + visual_token_bound(model.config.model.compressor, f)
    out = _compress(model.graphdef, model.state, features, device, max_seq_len=bound,
                    layer_params=model.layer_params)
    embeds, mask, positions, length, boundary, probs = jax.block_until_ready(out)
    timings["compressor_s"] = time.perf_counter() - t0
  length = np.asarray(length)
  seq = min(bound, _round_up(max(int(length.max()), 1), SEQ_MULTIPLE))
  return Prepared(embeds=embeds[:, :seq], mask=mask[:, :seq], positions=positions[:, :seq], length=length,
                  boundary=np.asarray(boundary), probs=np.asarray(probs), timings=timings)


def decoder_of(model):
  if getattr(model, "_decoder", None) is None:
    model._decoder = nnx.merge(model.graphdef, model.state).decoder
  return model._decoder


def generate(model, prepared: Prepared, *, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
             seed: int, repetition_penalty: float = 1.0, on_step=None) -> tuple[np.ndarray, dict]:
  """Prefill + decode; returns (tokens [B, max_new_tokens] int32, timings). `on_step(tokens [B, n])` is
  called after every new token when given (streaming: one decode call per token), else decode runs in
  one call."""
  key = jax.random.key(int(seed)) if temperature > 0 else None
  timings = {}
  with model.context():
    gen = Generator(decoder_of(model), max_new_tokens=max_new_tokens, eos_id=model.eos_id, pad_id=model.pad_id,
                    temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                    key=key, layer_params=model.layer_params)
    t0 = time.perf_counter()
    st = jax.block_until_ready(gen.start(inputs_embeds=prepared.embeds, mask=prepared.mask,
                                         positions=prepared.positions))
    timings["prefill_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if on_step is None:
      st = jax.block_until_ready(gen.advance(st))
    else:
      on_step(np.asarray(st.out[:, :1]))
      for n in range(2, max_new_tokens + 1):
        if bool(np.all(np.asarray(st.finished))):
          break
        st = gen.advance(st, n)
        on_step(np.asarray(st.out[:, :n]))
    out = np.asarray(st.out)
    timings["decode_s"] = time.perf_counter() - t0
  return out, timings


@partial(jax.jit, static_argnames=("graphdef",))
def _cubing(graphdef, state, frames, num_frames):
  model = nnx.merge(graphdef, state)
  features = model.frame_features(frames)
  cubes = model.compressor.compress(features, num_frames, None, 0.0, None)
  probs = gumbel.boundary_probs(cubes.logits, None, 0.0, model.compressor.settings.gumbel_tau)
  return cubes.boundary, probs


def cube_boundaries(model, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The cubing network's partition of one video at η = 0 (no decoder): (boundary [F], probs [F-1]) for
  frames uint8 [N, S, S, 3], padded to its frame bucket."""
  n = len(frames)
  f = frame_bucket(n, tuple(model.config.data.frame_buckets))
  padded = np.zeros((1, f) + frames.shape[1:], np.uint8)
  padded[0, :n] = frames
  with model.context():
    boundary, probs = _cubing(model.graphdef, model.state, _put(model, padded),
                              _put(model, np.asarray([n], np.int32)))
  return np.asarray(boundary)[0], np.asarray(probs)[0]
