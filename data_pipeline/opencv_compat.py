"""What the reference's OpenCV reader (`cv2.VideoCapture`, FFmpeg backend) does that PyAV does not by default.

Colour conversion. OpenCV converts every decoded picture with one legacy `sws_scale` call to BGR24, SWS_BICUBIC,
same size, and never passes colour metadata: the matrix is swscale's default (BT.601), the range is full only for
the `yuvj*` pixel formats (a 10-bit or `yuv444p` picture flagged full range is still read as limited range), and
4:2:0 chroma is taken as centre-sited whatever the stream signals. PyAV's `sws_scale_frame` reads the frame's
range, matrix and chroma siting instead, which moves 10-bit 4:2:0 pictures by up to ~30 levels on sharp chroma.
`to_rgb` copies the planes into a frame that carries no colour metadata and converts that to BGR24 with the same
flags, which reproduces OpenCV's pixels exactly (also the BGR24-specific x86 output path), then flips to RGB.

Frame numbering after a seek. The reference positions the capture with `CAP_PROP_POS_FRAMES = first sampled
index` and counts reads from there. OpenCV seeks to the keyframe at or before the time of `(N - delta) / FPS`
(delta 16, growing) and takes the number of the first decoded picture from its timestamp,
`int(FPS * (pts - start_time) * time_base + 0.5)`; it then reads forward one picture per number. On a
variable-frame-rate video that timestamp-derived number is not the picture's position, so frame `i` after the
seek is position `i + offset` with `offset` from `seek_offset`.
"""

import av
import numpy as np

CONVERT_OPTIONS = dict(format="bgr24", src_colorspace="ITU601", interpolation="BICUBIC")


def _bare_copy(frame):
  """The same pixels in a new frame without range, matrix or chroma-siting metadata (swscale's defaults apply)."""
  bare = av.VideoFrame(frame.width, frame.height, frame.format.name)
  for src, dst in zip(frame.planes, bare.planes):
    row = min(src.line_size, dst.line_size)
    rows = dst.buffer_size // dst.line_size
    src_rows = np.frombuffer(src, np.uint8)[:rows * src.line_size].reshape(rows, src.line_size)
    np.frombuffer(dst, np.uint8).reshape(rows, dst.line_size)[:, :row] = src_rows[:, :row]
  return bare


UNSCALED_8BIT = {"yuv420p": "MPEG", "yuvj420p": "JPEG", "yuv422p": "MPEG", "yuvj422p": "JPEG"}
"""8-bit formats swscale converts to BGR24 with its unscaled table path (even height), which ignores chroma
siting: for these the metadata-free copy is replaced by the range OpenCV's swscale call assumes."""


def to_rgb(frame) -> np.ndarray:
  """uint8 [H, W, 3] RGB exactly as OpenCV's `VideoCapture.read` + `cvtColor(BGR2RGB)` gives it; a view of the
  BGR24 buffer with a negative channel stride (callers copy it when they stack, rotate or resize)."""
  name = frame.format.name
  if name in UNSCALED_8BIT and frame.height % 2 == 0:
    bgr = frame.to_ndarray(**CONVERT_OPTIONS, src_color_range=UNSCALED_8BIT[name])
  elif name == "pal8" or not frame.planes:
    bgr = frame.to_ndarray(**CONVERT_OPTIONS)
  else:
    bgr = _bare_copy(frame).to_ndarray(**CONVERT_OPTIONS)
  return bgr[..., ::-1]


def _frame_number(pts: int, fps: float, start: int, time_base: float) -> int:
  """OpenCV's dts_to_frame_number: C truncation of FPS * seconds + 0.5."""
  return int(fps * ((pts - start) * time_base) + 0.5)


def seek_offset(packets, target: int, fps: float, frame_count: int, start: int, time_base: float) -> int:
  """Position (presentation rank) minus OpenCV's frame number for the frames read after
  `set(CAP_PROP_POS_FRAMES, target)`, from the demuxed packets [(pts, dts, is_keyframe, shown)] in decode order
  up to past the seek point. 0 for constant-frame-rate video (numbers equal positions)."""
  target = min(target, frame_count)
  shown_pts = sorted(p[0] for p in packets if p[3])
  if target <= 1 or not shown_pts:
    return 0
  first_number = _frame_number(shown_pts[0], fps, start, time_base) if shown_pts[0] != 0 else 0
  keys = [(dts if dts is not None else pts, pts) for pts, dts, key, shown in packets if key and shown]
  if not keys:
    return 0
  delta = 16
  while True:
    temp = max(target - delta, 0)
    stamp = start + int(temp / fps / time_base + 0.5)
    seek_ts, key_pts = next((k for k in reversed(keys) if k[0] <= stamp), keys[0])
    rank = sum(1 for t in shown_pts if t < key_pts)
    number = _frame_number(key_pts, fps, start, time_base) - first_number
    if 0 <= number <= target - 1:
      return rank - number
    if temp == 0 or delta >= (1 << 31) // 4:
      return rank + 1 - target  # OpenCV gives up after one read: the next read is called `target`
    delta = delta * 2 if delta < 16 else delta * 3 // 2
