"""Sequence assembly: the reference's merged decoder input (SPEC §5.2-§5.4) with static shapes.

The batch carries the pre-merge ids (`qv_jax/batch.py`): text, one `<image>` (-200) for the thumbnail and
one per frame, each frame's placeholder preceded by its timestamp tokens, all tagged with `token_frame`.
After cubing, the reference keeps a text token with token_frame -1, keeps a token with token_frame f iff
frame f starts a cube, and expands every kept placeholder into visual tokens. Here each pre-merge token gets
a length (0 dropped, 1 text, T thumbnail, Q cube or image crop) and a base index into one per-sample bank

  bank = [text embeddings (L) | thumbnail (T) | cube tokens (Kmax·Q) | image-crop tokens (I·Q)],

and every output slot s finds its source token by `searchsorted` over the cumulative lengths, so the merged
sequence is one gather into [B, max_seq_len, D]. Real tokens take positions 0..n-1; the rest is padding
(mask False). Tokens past max_seq_len are cut and counted (`truncated`). A packed row (qv_jax/batch.py)
holds several samples' tokens: each token's end slot is its sample's offset plus the sizes of the earlier
tokens of the same sample, so every sample lands at its own offset with positions restarting at 0.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from qv_jax.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX, MODALITY_VIDEO
from qv_jax.sharding import HIDDEN_AXES, constrain

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
  segment_ids: jax.Array   # int32 sample slot of the slot's token, -1 on padding


@flax.struct.dataclass
class Assembled:
  embeds: jax.Array        # [B, S, D]
  labels: jax.Array        # [B, S] int32, IGNORE_INDEX on visual tokens and padding
  positions: jax.Array     # [B, S] int32
  mask: jax.Array          # [B, S] bool
  segment_ids: jax.Array   # [B, S] int32 sample slot in a packed row (0 unpacked), -1 on padding
  length: jax.Array        # [B] int32 merged length before truncation
  truncated: jax.Array     # [B] int32 tokens cut at max_seq_len


def plan_sequence(input_ids, token_frame, token_valid, modality, boundary, cube_ids, *, thumb_len: int,
                  cube_len: int, num_cube_slots: int, image_len: int, num_image_slots: int,
                  max_seq_len: int, token_slot=None, sample_offset=None) -> SequencePlan:
  """Plans the merge. input_ids/token_frame/token_valid [B, L]; modality [B]; boundary [B, F] (> 0.5 where a
  cube starts); cube_ids [B, F]. Static: thumb_len T, cube_len Q, num_cube_slots Kmax, image_len, the image
  slots I (frames of an image sample) and max_seq_len S.

  Packed rows (qv_jax/batch.py): token_slot [B, L] (sample slot of each token, -1 on padding) and
  sample_offset [B, P]; modality [B, P], boundary / cube_ids [B, P, F]. Sample p's merged sequence starts at
  slot sample_offset[:, p] with position 0; the bank holds P thumbnails, P·Kmax cubes and P·I crops."""
  b, length = input_ids.shape
  if token_slot is None:
    token_slot = jnp.where(token_valid, 0, -1).astype(jnp.int32)
    sample_offset = jnp.zeros((b, 1), jnp.int32)
    modality, boundary, cube_ids = modality[:, None], boundary[:, None], cube_ids[:, None]
  num_slots, num_frames = boundary.shape[1], boundary.shape[2]
  slot = jnp.clip(token_slot, 0, num_slots - 1)
  in_sample = token_slot >= 0
  is_video = jnp.take_along_axis(modality, slot, axis=1) == MODALITY_VIDEO
  placeholder = input_ids == IMAGE_TOKEN_INDEX
  frame = jnp.clip(token_frame, 0, num_frames - 1)
  frame_of_token = slot * num_frames + frame
  starts = (jax.lax.stop_gradient(boundary) > 0.5).reshape(b, -1)
  frame_kept = jnp.take_along_axis(starts, frame_of_token, axis=1) & (token_frame >= 0)
  keep = token_valid & in_sample & ((token_frame < 0) | frame_kept)

  text = keep & ~placeholder
  thumb = keep & placeholder & is_video & (token_frame < 0)
  cube = keep & placeholder & is_video & (token_frame >= 0)
  image = keep & placeholder & ~is_video
  kind = (text * KIND_TEXT + thumb * KIND_THUMB + cube * KIND_CUBE + image * KIND_IMAGE).astype(jnp.int32)
  sizes = (text * 1 + thumb * thumb_len + cube * cube_len + image * image_len).astype(jnp.int32)

  slot_onehot = (token_slot[:, :, None] == jnp.arange(num_slots)[None, None, :]).astype(jnp.int32)
  def before_sample(per_token):
    """[B, L] -> [B, L]: the sum of per_token over the tokens of earlier sample slots."""
    per_slot = jnp.einsum("bl,blp->bp", per_token.astype(jnp.int32), slot_onehot)
    earlier = jnp.cumsum(per_slot, axis=1) - per_slot
    return jnp.take_along_axis(earlier, slot, axis=1)

  cube_of_token = jnp.take_along_axis(cube_ids.astype(jnp.int32).reshape(b, -1), frame_of_token, axis=1)
  image_placeholder = placeholder & ~is_video & in_sample
  image_in_sample = jnp.cumsum(image_placeholder, axis=1) - before_sample(image_placeholder) - 1
  image_of_token = jnp.clip(image_in_sample, 0, num_image_slots - 1)
  thumb_base = length
  cube_base = thumb_base + num_slots * thumb_len
  image_base = cube_base + num_slots * num_cube_slots * cube_len
  token_index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  cube_slot = slot * num_cube_slots + jnp.clip(cube_of_token, 0, num_cube_slots - 1)
  base = jnp.where(text, token_index,
                   jnp.where(thumb, thumb_base + slot * thumb_len,
                             jnp.where(cube, cube_base + cube_slot * cube_len,
                                       image_base + (slot * num_image_slots + image_of_token) * image_len)))

  offset_of_token = jnp.take_along_axis(sample_offset.astype(jnp.int32), slot, axis=1)
  in_sample_end = jnp.cumsum(sizes, axis=1) - before_sample(sizes)
  # [B, L] exclusive end slot of each token; a padding token ends where the previous one did (owns no slot)
  ends = jax.lax.cummax(jnp.where(in_sample, offset_of_token + in_sample_end, 0), axis=1)
  slots = jnp.arange(max_seq_len, dtype=jnp.int32)
  src_token = jax.vmap(lambda e: jnp.searchsorted(e, slots, side="right"))(ends)
  src_token = jnp.clip(src_token, 0, length - 1).astype(jnp.int32)
  token_end = jnp.take_along_axis(ends, src_token, axis=1)
  token_size = jnp.take_along_axis(sizes, src_token, axis=1)
  offset = slots[None, :] - (token_end - token_size)
  src_text = jnp.take_along_axis(text, src_token, axis=1)
  source = jnp.take_along_axis(base, src_token, axis=1) + jnp.where(src_text, 0, offset)
  mask = (offset >= 0) & (offset < token_size)
  src_slot = jnp.take_along_axis(token_slot, src_token, axis=1)
  positions = slots[None, :] - jnp.take_along_axis(offset_of_token, src_token, axis=1)
  segments = jnp.where(mask, src_slot, -1)
  total = sizes.sum(axis=1)
  return SequencePlan(source=jnp.where(mask, source, 0).astype(jnp.int32), is_text=src_text & mask,
                      text_index=src_token, mask=mask, positions=jnp.where(mask, positions, 0),
                      length=total, kind=kind, segment_ids=segments.astype(jnp.int32))


def assemble(plan: SequencePlan, text_embeds, thumbnail, cube_tokens, image_tokens, labels) -> Assembled:
  """Gathers the merged embeddings. text_embeds [B, L, D]; thumbnail [B, T, D]; cube_tokens [B, Kmax, Q, D];
  image_tokens [B, I, Q', D] or None (no image samples); labels [B, L]."""
  b, _, d = text_embeds.shape
  dtype = text_embeds.dtype
  parts = [text_embeds, thumbnail.astype(dtype), cube_tokens.reshape(b, -1, d).astype(dtype)]
  if image_tokens is not None:
    parts.append(image_tokens.reshape(b, -1, d).astype(dtype))
  bank = constrain(jnp.concatenate(parts, axis=1), ("activation_batch", None, "activation_embed"))
  embeds = jnp.take_along_axis(bank, plan.source[..., None], axis=1)
  embeds = constrain(jnp.where(plan.mask[..., None], embeds, 0).astype(dtype), HIDDEN_AXES)
  # A sample's first token is never a target: the one-token shift must not cross into another sample.
  supervised = plan.is_text & (plan.positions > 0)
  out_labels = jnp.where(supervised, jnp.take_along_axis(labels, plan.text_index, axis=1), IGNORE_INDEX)
  max_len = plan.mask.shape[1]
  return Assembled(embeds=embeds, labels=out_labels.astype(jnp.int32), positions=plan.positions,
                   mask=plan.mask, segment_ids=plan.segment_ids, length=plan.length,
                   truncated=jnp.maximum(plan.length - max_len, 0).astype(jnp.int32))


def merged_length_bound(text_len: int, thumb_len: int, cube_len: int, num_cube_slots: int, image_len: int,
                        num_image_slots: int) -> int:
  """An upper bound of the merged length: every text slot kept plus the largest visual expansion."""
  video = text_len + thumb_len + num_cube_slots * cube_len
  image = text_len + num_image_slots * image_len
  return max(video, image)
