"""The whole Quicksviewer: SigLIP tower → compressor (cubing, resampler, thumbnail) → sequence assembly →
Qwen2 / Llama 3 decoder.

Param tree: `vision_tower/...` (qv_jax/model/vision_tower.py), `compressor/...` (qv_jax/model/compressor.py),
`decoder/...` (qv_jax/model/decoder.py). A batch follows `qv_jax/batch.py`; every shape is static.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from qv_jax.batch import MODALITY_VIDEO, SLOT_KEYS, is_packed
from qv_jax.config.typed import ModelConfig, expect
from qv_jax.model import assembly
from qv_jax.model.compressor import CompressorOutput
from qv_jax.model.compressors.base import CompressorInputs
from qv_jax.model.compressors.compact import compact_plan
from qv_jax.model.compressors.registry import build_compressor
from qv_jax.model.decoder import Decoder
from qv_jax.model.vision_tower import SiglipVisionTower
from qv_jax.parallel.context import check_divisible, context_size
from qv_jax.parallel.context_vision import encode_frames_split
from qv_jax.sharding import FRAME_AXES, constrain


@flax.struct.dataclass
class ModelOutput:
  hidden: jax.Array                    # [B, S, D] final-normed decoder states (compute dtype)
  inputs: assembly.Assembled           # the merged sequence (labels, mask, positions, ...)
  cubes: CompressorOutput              # boundaries, cube ids, logits, ...


class Quicksviewer(nnx.Module):
  """`Quicksviewer(config.model, max_seq_len=config.data.max_seq_len, rngs=)` over a validated
  `ModelConfig`; max_seq_len: the static merged decoder length."""

  def __init__(self, config: ModelConfig, *, max_seq_len: int, rngs: nnx.Rngs):
    expect(config, ModelConfig, "Quicksviewer")
    self.max_seq_len = int(max_seq_len)
    self.vision_tower = SiglipVisionTower(config.vision, rngs=rngs)
    self.compressor = build_compressor(config.compressor, rngs=rngs)
    self.decoder = Decoder(config.decoder, rngs=rngs)

  def frame_features(self, frames: jax.Array) -> jax.Array:
    """frames [B, F, S, S, 3] uint8 (normalised chunk by chunk inside the tower) or float in [-1, 1]
    -> [B, F, P, Dv]."""
    if context_size() > 1:
      return encode_frames_split(self.vision_tower, frames)
    return constrain(self.vision_tower.encode_frames(frames), FRAME_AXES)

  def prepare_inputs(self, batch: dict, *, key: jax.Array, noise_weight, encode_images: bool = True,
                     features: jax.Array | None = None, max_seq_len: int | None = None, layer_params=None
                     ) -> tuple[assembly.Assembled, CompressorOutput]:
    """Vision, compression and assembly: the decoder's merged inputs [B, max_seq_len, D], or for a packed
    batch [R, N, D] (every sample slot gets its own vision / compressor pass).
    `features` [B, F, P, Dv]: the tower's output when already computed; `max_seq_len` overrides the
    config's static merged length (inference sizes it per bucket; unpacked batches only); `layer_params`:
    per-layer decoder params when the decoder is unstacked (read by question-conditioned compressors)."""
    rows = None
    if is_packed(batch):
      rows = batch["input_ids"].shape[0]
      max_seq_len = batch["segment_ids"].shape[1]
      batch = dict(batch, **{k: batch[k].reshape((-1,) + batch[k].shape[2:]) for k in SLOT_KEYS})
      if self.compressor.needs_question:
        raise ValueError("packed rows (data.pack_samples > 1) need a compressor that reads no question span")
    if features is None:
      features = self.frame_features(batch["frames"])
    inputs = self.compressor_inputs(batch, features, key=key, noise_weight=noise_weight, layer_params=layer_params)
    cubes = self.compressor.encode(inputs)
    merged = self.assemble_inputs(batch, features, cubes, encode_images=encode_images, max_seq_len=max_seq_len,
                                  rows=rows)
    return merged, cubes

  def compressor_inputs(self, batch: dict, features, *, key, noise_weight, layer_params=None) -> CompressorInputs:
    """The registry contract's inputs (the question span and the attention scorer where the kind needs
    them)."""
    is_video = batch["modality"] == MODALITY_VIDEO
    # Image samples pass through the video path too (static shapes); their outputs are never read.
    cube_frames = jnp.where(is_video, batch["num_frames"], jnp.maximum(batch["num_frames"], 2))
    inputs = CompressorInputs(features, cube_frames.astype(jnp.int32), key=key, noise_weight=noise_weight,
                              sample_ids=batch["sample_id"])
    if self.compressor.needs_question:
      from qv_jax.model.compressors import question_select
      inputs.question, inputs.scorer = question_select.question_context(self.decoder, batch, self.compressor,
                                                                         layer_params=layer_params)
    return inputs

  def assemble_inputs(self, batch: dict, features, cubes: CompressorOutput, *, encode_images: bool = True,
                      max_seq_len: int | None = None, rows: int | None = None) -> assembly.Assembled:
    """The merged sequence of a compressor output (kept tokens only where it has a token mask). `rows`: the
    packed batch's row count (its slot arrays already flattened to [R·P, ...]), None when not packed."""
    image_tokens = self.compressor.encode_images(features) if encode_images else None
    text_embeds = self.decoder.embed(jnp.maximum(batch["input_ids"], 0))
    _, kmax, q, _ = cubes.cube_tokens.shape
    sizes = dict(thumb_len=cubes.thumbnail.shape[1], cube_len=q, num_cube_slots=kmax,
                 image_len=q if image_tokens is None else image_tokens.shape[2],
                 num_image_slots=features.shape[1])
    out_len = self.max_seq_len if max_seq_len is None else int(max_seq_len)
    if rows is not None:
      if cubes.token_mask is not None:
        raise ValueError("packed rows (data.pack_samples > 1) need a compressor without a token mask")
      per_row = lambda x: x.reshape((rows, -1) + x.shape[1:])
      plan = assembly.plan_sequence(
          batch["input_ids"], batch["token_frame"], batch["token_valid"], per_row(batch["modality"]),
          per_row(cubes.boundary), per_row(cubes.cube_ids), max_seq_len=out_len,
          token_slot=batch["token_slot"], sample_offset=batch["sample_offset"], **sizes)
      # A row's bank holds its slots' visual tokens one slot after another.
      flat = lambda x: None if x is None else x.reshape((rows, -1) + x.shape[2:])
      return assembly.assemble(plan, text_embeds, flat(cubes.thumbnail), flat(cubes.cube_tokens),
                               flat(image_tokens), batch["labels"])
    length = out_len
    if cubes.token_mask is not None:
      length = assembly.merged_length_bound(batch["input_ids"].shape[1], **sizes)
    plan = assembly.plan_sequence(
        batch["input_ids"], batch["token_frame"], batch["token_valid"], batch["modality"], cubes.boundary,
        cubes.cube_ids, max_seq_len=length, **sizes)
    if cubes.token_mask is not None:
      plan = compact_plan(plan, cubes.token_mask, cube_base=batch["input_ids"].shape[1] + sizes["thumb_len"],
                          max_seq_len=out_len)
    return assembly.assemble(plan, text_embeds, cubes.thumbnail, cubes.cube_tokens, image_tokens,
                             batch["labels"])

  def __call__(self, batch: dict, *, key: jax.Array, noise_weight, encode_images: bool = True
               ) -> ModelOutput:
    """Training forward: the final hidden states (the trainer computes logits in chunks)."""
    check_divisible("data.max_seq_len", self.max_seq_len, context_size())
    merged, cubes = self.prepare_inputs(batch, key=key, noise_weight=noise_weight,
                                        encode_images=encode_images)
    hidden, _ = self.decoder(inputs_embeds=merged.embeds, positions=merged.positions, mask=merged.mask,
                             return_hidden=True,
                             segment_ids=merged.segment_ids if is_packed(batch) else None)
    return ModelOutput(hidden=hidden, inputs=merged, cubes=cubes)
