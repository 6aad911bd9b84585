"""Anyres image crops (SPEC §1.3) on hand-worked sizes."""

import io

import numpy as np
import pytest
from PIL import Image

from data_pipeline.image import (DEFAULT_PINPOINTS, anyres_crops, read_image_crops, resize_and_pad,
                                 select_best_resolution)


def image(w, h, seed=0):
  # values 64..191: no black pixel, even after bicubic ringing
  return np.random.default_rng(seed).integers(64, 192, (h, w, 3), dtype=np.uint8)


def test_best_resolution_landscape():
  # 640x480: (448,448) scale .7 -> 448x336 = 150528, the most effective area of all pinpoints
  assert select_best_resolution((640, 480), DEFAULT_PINPOINTS) == (448, 448)


def test_best_resolution_wide_and_tall():
  # 1000x200: (896,224) scale .896 -> 896x179 = 160384 beats (448,448) at .448 -> 448x89
  assert select_best_resolution((1000, 200), DEFAULT_PINPOINTS) == (896, 224)
  # 200x1000 mirrors it
  assert select_best_resolution((200, 1000), DEFAULT_PINPOINTS) == (224, 896)


def test_best_resolution_tie_breaks_by_least_waste():
  # 100x100 fits unscaled-equal into every pinpoint (effective = 10000, capped at the original area);
  # the least waste is the smallest canvas, 224x448 (first of the three 100352-pixel ones)
  assert select_best_resolution((100, 100), DEFAULT_PINPOINTS) == (224, 448)


def test_resize_and_pad_centres_on_black():
  img = image(640, 480)
  canvas = resize_and_pad(img, (448, 448))
  # scale_w = .7 < scale_h = .933: 448 x ceil(480 * .7) = 448x336, pasted at y = (448 - 336) // 2 = 56
  assert canvas.shape == (448, 448, 3)
  assert (canvas[:56] == 0).all() and (canvas[392:] == 0).all()
  expected = np.asarray(Image.fromarray(img).resize((448, 336), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(canvas[56:392], expected)


def test_crops_of_a_landscape_image():
  img = image(640, 480)
  crops = anyres_crops(img)
  # base + the 384-px grid over the 448x448 canvas: (0,0), (384,0), (0,384), (384,384) -> 4 patches
  assert crops.shape == (5, 384, 384, 3) and crops.dtype == np.uint8
  np.testing.assert_array_equal(crops[0], np.asarray(Image.fromarray(img).resize((384, 384), Image.Resampling.BICUBIC)))
  top_left, top_right, bottom_left, bottom_right = crops[1:]
  assert (top_left[:56] == 0).all() and (top_left[56:] != 0).any(axis=-1).all()   # image rows 56.. of the canvas
  assert (top_right[:, 64:] == 0).all()                # the canvas is 448 wide: columns 384..447 only
  assert (bottom_left[8:] == 0).all()                  # canvas rows 384..391 hold the last 8 image rows
  assert (bottom_left[:8] != 0).any(axis=-1).all()
  assert (bottom_right[8:] == 0).all() and (bottom_right[:, 64:] == 0).all()


def test_crops_of_a_wide_image():
  # 1000x200 -> (896, 224): scale_h = 1.12 > scale_w = .896 -> 896 x ceil(200 * .896) = 896x180 at y = 22;
  # patches at x = 0, 384, 768 (the last only 128 wide) and y = 0 only -> 3 patches
  crops = anyres_crops(image(1000, 200))
  assert crops.shape == (4, 384, 384, 3)
  assert (crops[1][:22] == 0).all() and (crops[1][202:] == 0).all() and (crops[1][22:202] != 0).any(-1).all()
  assert (crops[3][:, 128:] == 0).all()


def test_read_from_bytes_and_path_and_grey(tmp_path):
  img = image(300, 200)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  path = tmp_path / "x.png"
  path.write_bytes(buf.getvalue())
  a, b = read_image_crops(buf.getvalue()), read_image_crops(str(path))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, anyres_crops(img))
  Image.fromarray(img[..., 0]).save(tmp_path / "g.png")  # greyscale is converted to RGB like .convert('RGB')
  assert read_image_crops(str(tmp_path / "g.png")).shape[-1] == 3


@pytest.mark.parametrize("size, n", [((640, 480), 4), ((1000, 200), 3), ((200, 1000), 3), ((300, 300), 4),
                                     ((150, 400), 2)])
def test_every_pinpoint_gives_two_to_four_patches(size, n):
  assert anyres_crops(image(*size)).shape[0] == 1 + n
