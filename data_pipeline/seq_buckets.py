"""The exact merged-length bound of a sample, known before the model runs, and its sequence bucket.

A video of N frames always gets k + 1 = num_cubes(N) cubes (SPEC §3; frame 0 starts one): its merged
sequence (SPEC §5.2) is its text outside the frames, the thumbnail (T tokens), k + 1 cubes of Q tokens and
the timestamp tokens of the cubes' first frames. Which frames start cubes is learned, so the bound takes
frame 0's timestamp plus the k longest of the others: reached by some partition, never exceeded. An image
(or text-only, one dummy image) sample's merged length is exact: its text plus Q tokens per crop.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qv_jax.batch import IMAGE_TOKEN_INDEX, MODALITY_VIDEO
from qv_jax.model.gumbel import num_cubes


def merged_length_bound(input_ids: np.ndarray, token_frame: np.ndarray, modality: int, num_frames: int, *,
                        thumb_len: int, cube_len: int, image_len: int, frames_per_cube: int) -> int:
  """The largest merged length this sample's pre-merge ids [t] can take after cubing."""
  ids = np.asarray(input_ids)
  frames = np.asarray(token_frame)
  placeholder = ids == IMAGE_TOKEN_INDEX
  if modality != MODALITY_VIDEO:
    return int((~placeholder).sum() + placeholder.sum() * image_len)
  text = int(((~placeholder) & (frames < 0)).sum())
  timestamp_len = np.bincount(frames[(~placeholder) & (frames >= 0)], minlength=num_frames)[:num_frames]
  cubes = num_cubes(int(num_frames), frames_per_cube)
  others = np.sort(timestamp_len[1:])[::-1][:cubes - 1]
  return text + int(timestamp_len[0]) + int(others.sum()) + thumb_len + cubes * cube_len


def bound_settings(model_config) -> dict:
  """The static token counts of `merged_length_bound` for `config.model`."""
  c, v = model_config.compressor, model_config.vision
  return dict(thumb_len=(v.grid_out ** 2) // c.thumbnail_pool, cube_len=int(c.num_queries),
              image_len=int(c.num_queries), frames_per_cube=int(c.frames_per_cube))


def pick_seq_bucket(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket ≥ length; ValueError naming data.seq_buckets if none is."""
  for bucket in buckets:
    if length <= bucket:
      return int(bucket)
  raise ValueError(f"a merged length of {length} tokens does not fit the largest sequence bucket "
                   f"{buckets[-1]} (config field `data.seq_buckets`)")
