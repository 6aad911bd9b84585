"""Image samples: anyres crops (SPEC §1.3): a base image resized to S×S, then the S-px patches of the image
resized and padded to the best pinpoint. With the reference pinpoints (sized for 224-px encoders) every image
gives 2, 3 or 4 mostly black patches; that is what the released model was trained on."""

import io
import math
import os

import numpy as np
from PIL import Image

from data_pipeline.errors import BadSampleError
from data_pipeline.preprocess import resize_image

DEFAULT_PINPOINTS = ((224, 448), (224, 672), (224, 896), (448, 448), (448, 224), (672, 224), (896, 224))


def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
  """The (W, H) pinpoint with the largest effective resolution, ties broken by least waste. `size` is (w, h)."""
  w, h = size
  best, best_effective, best_waste = None, 0, math.inf
  for pw, ph in pinpoints:
    scale = min(pw / w, ph / h)
    effective = min(int(w * scale) * int(h * scale), w * h)
    waste = pw * ph - effective
    if effective > best_effective or (effective == best_effective and waste < best_waste):
      best, best_effective, best_waste = (pw, ph), effective, waste
  return best


def resize_and_pad(image: np.ndarray, target: tuple[int, int]) -> np.ndarray:
  """Scale uint8 [h, w, 3] to fit (W, H) (ceil on the scaled side), centred on a black W×H canvas."""
  h, w = image.shape[:2]
  tw, th = target
  sw, sh = tw / w, th / h
  if sw < sh:
    nw, nh = tw, min(math.ceil(h * sw), th)
  else:
    nw, nh = min(math.ceil(w * sh), tw), th
  resized = resize_image(image, (nw, nh))
  canvas = np.zeros((th, tw, 3), np.uint8)
  x0, y0 = (tw - nw) // 2, (th - nh) // 2
  canvas[y0:y0 + nh, x0:x0 + nw] = resized
  return canvas


def divide_to_patches(image: np.ndarray, patch: int) -> list[np.ndarray]:
  """Row-major patch×patch crops at (j, i), zero-filled past the canvas (as PIL's crop does)."""
  h, w = image.shape[:2]
  out = []
  for i in range(0, h, patch):
    for j in range(0, w, patch):
      crop = np.zeros((patch, patch, 3), np.uint8)
      part = image[i:i + patch, j:j + patch]
      crop[:part.shape[0], :part.shape[1]] = part
      out.append(crop)
  return out


def anyres_crops(image: np.ndarray, *, image_size: int = 384, pinpoints=DEFAULT_PINPOINTS) -> np.ndarray:
  """uint8 RGB [h, w, 3] -> uint8 [1 + n, S, S, 3]: base image, then the anyres patches."""
  h, w = image.shape[:2]
  best = select_best_resolution((w, h), [tuple(p) for p in pinpoints])
  patches = divide_to_patches(resize_and_pad(image, best), image_size)
  base = resize_image(image, image_size)
  return np.stack([base] + patches)


def decode_image(source: str | os.PathLike | bytes) -> np.ndarray:
  """Any PIL-readable image (path or bytes) -> uint8 RGB [h, w, 3]. Raises BadSampleError."""
  name = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)
  if not isinstance(source, (bytes, bytearray, memoryview)):
    if not os.path.exists(name):
      raise BadSampleError("missing_file", "image file does not exist", name)
    if os.path.getsize(name) == 0:
      raise BadSampleError("empty_file", "image file is empty (0 bytes)", name)
  elif len(source) == 0:
    raise BadSampleError("empty_file", "image bytes are empty", name)
  try:
    with Image.open(io.BytesIO(bytes(source)) if name == "<bytes>" else name) as img:
      img.load()
      rgb = img.convert("RGB")
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise BadSampleError("bad_image", f"cannot decode image: {e}", name) from None
  if rgb.width == 0 or rgb.height == 0:
    raise BadSampleError("bad_image", "image has zero size", name)
  return np.asarray(rgb)


def read_image_crops(source: str | os.PathLike | bytes, *, image_size: int = 384,
                     pinpoints=DEFAULT_PINPOINTS) -> np.ndarray:
  """uint8 [1 + n, S, S, 3]: the base image resized to S×S, then the anyres crops. Raises BadSampleError."""
  return anyres_crops(decode_image(source), image_size=image_size, pinpoints=pinpoints)
