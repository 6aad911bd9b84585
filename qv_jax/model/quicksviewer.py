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

from qv_jax.batch import MODALITY_VIDEO
from qv_jax.model import assembly
from qv_jax.model.compressor import Compressor, CompressorOutput
from qv_jax.model.decoder import Decoder
from qv_jax.model.vision_tower import SiglipVisionTower
from qv_jax.parallel.context import check_divisible, context_size
from qv_jax.parallel.context_vision import encode_frames_split
from qv_jax.sharding import constrain


@flax.struct.dataclass
class ModelOutput:
  hidden: jax.Array                    # [B, S, D] final-normed decoder states (compute dtype)
  inputs: assembly.Assembled           # the merged sequence (labels, mask, positions, ...)
  cubes: CompressorOutput              # boundaries, cube ids, logits, ...


class Quicksviewer(nnx.Module):
  """`Quicksviewer(config, rngs=)` with `config.model` (sizes, dtypes) and `config.data.max_seq_len`
  (the static decoder length)."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.max_seq_len = int(config.data.max_seq_len)
    self.vision_tower = SiglipVisionTower(config.model, rngs=rngs)
    self.compressor = Compressor(config.model, rngs=rngs)
    self.decoder = Decoder(config.model, rngs=rngs)

  def frame_features(self, frames: jax.Array) -> jax.Array:
    """frames [B, F, S, S, 3] uint8 (normalised chunk by chunk inside the tower) or float in [-1, 1]
    -> [B, F, P, Dv]."""
    if context_size() > 1:
      return encode_frames_split(self.vision_tower, frames)
    return constrain(self.vision_tower.encode_frames(frames), ("batch", "frames", "tokens", "vision_embed"))

  def prepare_inputs(self, batch: dict, *, key: jax.Array, noise_weight, encode_images: bool = True
                     ) -> tuple[assembly.Assembled, CompressorOutput]:
    """Vision, cubing, resampling and assembly: the decoder's merged inputs [B, max_seq_len, D]."""
    features = self.frame_features(batch["frames"])
    is_video = batch["modality"] == MODALITY_VIDEO
    # Image samples pass through the cubing path too (static shapes); their outputs are never read.
    cube_frames = jnp.where(is_video, batch["num_frames"], jnp.maximum(batch["num_frames"], 2))
    cubes = self.compressor(features, cube_frames.astype(jnp.int32), key=key, noise_weight=noise_weight,
                            sample_ids=batch["sample_id"])
    image_tokens = self.compressor.encode_images(features) if encode_images else None
    text_embeds = self.decoder.embed(jnp.maximum(batch["input_ids"], 0))
    _, kmax, q, _ = cubes.cube_tokens.shape
    plan = assembly.plan_sequence(
        batch["input_ids"], batch["token_frame"], batch["token_valid"], batch["modality"], cubes.boundary,
        cubes.cube_ids, thumb_len=cubes.thumbnail.shape[1], cube_len=q, num_cube_slots=kmax,
        image_len=q if image_tokens is None else image_tokens.shape[2],
        num_image_slots=features.shape[1], max_seq_len=self.max_seq_len)
    merged = assembly.assemble(plan, text_embeds, cubes.thumbnail, cubes.cube_tokens, image_tokens,
                               batch["labels"])
    return merged, cubes

  def __call__(self, batch: dict, *, key: jax.Array, noise_weight, encode_images: bool = True
               ) -> ModelOutput:
    """Training forward: the final hidden states (the trainer computes logits in chunks)."""
    check_divisible("data.max_seq_len", self.max_seq_len, context_size())
    merged, cubes = self.prepare_inputs(batch, key=key, noise_weight=noise_weight,
                                        encode_images=encode_images)
    hidden, _ = self.decoder(inputs_embeds=merged.embeds, positions=merged.positions, mask=merged.mask,
                             return_hidden=True)
    return ModelOutput(hidden=hidden, inputs=merged, cubes=cubes)
