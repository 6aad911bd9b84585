"""Sequence assembly: the reference's merged decoder input (SPEC §5.2-§5.4) with static shapes.

The batch carries the pre-merge ids (`qv_jax/batch.py`): text, one `<image>` (-200) for the thumbnail and
one per frame, each frame's placeholder preceded by its timestamp tokens, all tagged with `token_frame`.
After cubing, the reference keeps a text token with token_frame -1, keeps a token with token_frame f iff
frame f starts a cube, and expands every kept placeholder into visual tokens. Here each pre-merge token gets
a length (0 dropped, 1 text, T thumbnail, Q cube or image crop) and a base index into one per-sample bank

  bank = [text embeddings (L) | thumbnail (T) | cube tokens (Kmax·Q) | image-crop tokens (I·Q)],

and every output slot s finds its source token by `searchsorted` over the cumulative lengths, so the merged
sequence is one gather into [B, max_seq_len, D]. Real tokens take positions 0..n-1; the rest is padding
(mask False). Tokens past max_seq_len are cut and counted (`truncated`).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from qv_jax.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX, MODALITY_VIDEO
from qv_jax.sharding import constrain

KIND_DROP, KIND_TEXT, KIND_THUMB, KIND_CUBE, KIND_IMAGE = 0, 1, 2, 3, 4


@flax.struct.dataclass
class SequencePlan:
  """Where every output slot reads from. All [B, S] unless noted."""
  source: jax.Array        # int32 index into the bank
  is_text: jax.Array       # bool: slot holds a text token (its label is kept)
  text_index: jax.Array    # int32 pre-merge index of the source token
  mask: jax.Array          # bool: a real token (False on padding)
  positions: jax.Array     # int32 0..n-1 over real tokens, 0 on padding
  length: jax.Array        # [B] int32 merged length before truncation
  kind: jax.Array          # [B, L] int32 per pre-merge token: KIND_*


@flax.struct.dataclass
class Assembled:
  embeds: jax.Array        # [B, S, D]
  labels: jax.Array        # [B, S] int32, IGNORE_INDEX on visual tokens and padding
  positions: jax.Array     # [B, S] int32
  mask: jax.Array          # [B, S] bool
  length: jax.Array        # [B] int32 merged length before truncation
  truncated: jax.Array     # [B] int32 tokens cut at max_seq_len


def plan_sequence(input_ids, token_frame, token_valid, modality, boundary, cube_ids, *, thumb_len: int,
                  cube_len: int, num_cube_slots: int, image_len: int, num_image_slots: int,
                  max_seq_len: int) -> SequencePlan:
  """Plans the merge. input_ids/token_frame/token_valid [B, L]; modality [B]; boundary [B, F] (> 0.5 where a
  cube starts); cube_ids [B, F]. Static: thumb_len T, cube_len Q, num_cube_slots Kmax, image_len, the image
  slots I (frames of an image sample) and max_seq_len S."""
  b, length = input_ids.shape
  num_frames = boundary.shape[1]
  is_video = (modality == MODALITY_VIDEO)[:, None]
  placeholder = input_ids == IMAGE_TOKEN_INDEX
  frame = jnp.clip(token_frame, 0, num_frames - 1)
  starts = jax.lax.stop_gradient(boundary) > 0.5
  frame_kept = jnp.take_along_axis(starts, frame, axis=1) & (token_frame >= 0)
  keep = token_valid & ((token_frame < 0) | frame_kept)

  text = keep & ~placeholder
  thumb = keep & placeholder & is_video & (token_frame < 0)
  cube = keep & placeholder & is_video & (token_frame >= 0)
  image = keep & placeholder & ~is_video
  kind = (text * KIND_TEXT + thumb * KIND_THUMB + cube * KIND_CUBE + image * KIND_IMAGE).astype(jnp.int32)
  sizes = (text * 1 + thumb * thumb_len + cube * cube_len + image * image_len).astype(jnp.int32)

  cube_of_token = jnp.take_along_axis(cube_ids.astype(jnp.int32), frame, axis=1)
  image_of_token = jnp.clip(jnp.cumsum(placeholder & ~is_video, axis=1) - 1, 0, num_image_slots - 1)
  thumb_base = length
  cube_base = thumb_base + thumb_len
  image_base = cube_base + num_cube_slots * cube_len
  token_index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  base = jnp.where(text, token_index,
                   jnp.where(thumb, thumb_base,
                             jnp.where(cube, cube_base + jnp.clip(cube_of_token, 0, num_cube_slots - 1)
                                       * cube_len, image_base + image_of_token * image_len)))

  ends = jnp.cumsum(sizes, axis=1)                                 # [B, L] exclusive end of each token
  slots = jnp.arange(max_seq_len, dtype=jnp.int32)
  src_token = jax.vmap(lambda e: jnp.searchsorted(e, slots, side="right"))(ends)
  src_token = jnp.clip(src_token, 0, length - 1).astype(jnp.int32)
  token_end = jnp.take_along_axis(ends, src_token, axis=1)
  token_size = jnp.take_along_axis(sizes, src_token, axis=1)
  offset = slots[None, :] - (token_end - token_size)
  src_text = jnp.take_along_axis(text, src_token, axis=1)
  source = jnp.take_along_axis(base, src_token, axis=1) + jnp.where(src_text, 0, offset)
  total = ends[:, -1]
  mask = slots[None, :] < total[:, None]
  return SequencePlan(source=jnp.where(mask, source, 0).astype(jnp.int32), is_text=src_text & mask,
                      text_index=src_token, mask=mask, positions=jnp.where(mask, slots[None, :], 0),
                      length=total, kind=kind)


def assemble(plan: SequencePlan, text_embeds, thumbnail, cube_tokens, image_tokens, labels) -> Assembled:
  """Gathers the merged embeddings. text_embeds [B, L, D]; thumbnail [B, T, D]; cube_tokens [B, Kmax, Q, D];
  image_tokens [B, I, Q', D] or None (no image samples); labels [B, L]."""
  b, _, d = text_embeds.shape
  dtype = text_embeds.dtype
  parts = [text_embeds, thumbnail.astype(dtype), cube_tokens.reshape(b, -1, d).astype(dtype)]
  if image_tokens is not None:
    parts.append(image_tokens.reshape(b, -1, d).astype(dtype))
  bank = constrain(jnp.concatenate(parts, axis=1), ("batch", None, "embed"))
  embeds = jnp.take_along_axis(bank, plan.source[..., None], axis=1)
  embeds = constrain(jnp.where(plan.mask[..., None], embeds, 0).astype(dtype), ("batch", "length", "embed"))
  out_labels = jnp.where(plan.is_text, jnp.take_along_axis(labels, plan.text_index, axis=1), IGNORE_INDEX)
  max_len = plan.mask.shape[1]
  return Assembled(embeds=embeds, labels=out_labels.astype(jnp.int32), positions=plan.positions,
                   mask=plan.mask, length=plan.length,
                   truncated=jnp.maximum(plan.length - max_len, 0).astype(jnp.int32))


def merged_length_bound(text_len: int, thumb_len: int, cube_len: int, num_cube_slots: int, image_len: int,
                        num_image_slots: int) -> int:
  """An upper bound of the merged length: every text slot kept plus the largest visual expansion."""
  video = text_len + thumb_len + num_cube_slots * cube_len
  image = text_len + num_image_slots * image_len
  return max(video, image)
