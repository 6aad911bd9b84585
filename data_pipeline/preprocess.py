"""Frame preprocessing as the SigLIP processor does it (SPEC §1.2): PIL bicubic resize, then (x/255-0.5)/0.5.

The reference resizes uint8 RGB PIL images with `Image.resize((S, S), BICUBIC)` and only then rescales, so
resizing uint8 frames with PIL here is bit-exact. `normalize` reproduces the processor's arithmetic (rescale
in float64, cast to float32, then `(x - 0.5) / 0.5` in float32) through a 256-entry table.
"""

import numpy as np
from PIL import Image

NORMALIZE_TABLE = ((np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
                   - np.float32(0.5)) / np.float32(0.5)
"""float32 [256]: the processor's value for each uint8 level; `table[frames]` (numpy or jnp) is bit-exact."""


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [h, w, 3] with PIL bicubic; `size` is S (square) or (w, h) as PIL takes it."""
  wh = (size, size) if isinstance(size, int) else tuple(size)
  if image.shape[1] == wh[0] and image.shape[0] == wh[1]:
    return np.ascontiguousarray(image)
  return np.asarray(Image.fromarray(image).resize(wh, Image.Resampling.BICUBIC))


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
  """uint8 [N, H, W, 3] -> uint8 [N, size, size, 3], PIL bicubic, aspect ratio ignored (no crop, no pad)."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"resize_frames: expected uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
  out = np.empty((frames.shape[0], size, size, 3), np.uint8)
  for i, frame in enumerate(frames):
    out[i] = resize_image(frame, size)
  return out


def normalize(frames: np.ndarray) -> np.ndarray:
  """uint8 [...] -> float32 in [-1, 1]: (x / 255 - 0.5) / 0.5, bit-equal to the SigLIP processor."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    raise ValueError(f"normalize: expected uint8 pixels, got {frames.dtype}")
  return NORMALIZE_TABLE[frames]


DUMMY_GREY = 128
"""uint8 level of the text-only dummy image: the reference feeds 0.0 after normalisation (mid-grey, SPEC §1.7),
which no uint8 level gives; 128 is the nearest (+1/255). With normalize_on_host the dummy is exactly 0.0."""


def dummy_image(image_size: int, normalized: bool) -> np.ndarray:
  """The text-only sample's one image [1, S, S, 3]: float32 zeros when `normalized`, else uint8 DUMMY_GREY."""
  if normalized:
    return np.zeros((1, image_size, image_size, 3), np.float32)
  return np.full((1, image_size, image_size, 3), DUMMY_GREY, np.uint8)
