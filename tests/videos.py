"""Test videos encoded with PyAV, and broken files. Shared by the decode and loader tests.

Every frame shows its own index as a 4×4 grid of black/white cells (bit k of the index in cell k, row-major,
over the upright picture), so a test can read back which frame a decoder returned, after any resize or
rotation: `frame_index_of(rgb)`. All writers are deterministic and small (64×36 unless said otherwise).
"""

import fractions
import os

import av
import numpy as np

GRID = 4  # 4×4 cells: 16 bits, indices < 65536


def frame_pattern(index: int, width: int, height: int) -> np.ndarray:
  """uint8 [H, W, 3] RGB: bit k of `index` as cell k (white = 1) of a 4×4 grid, cells tinted per row."""
  img = np.zeros((height, width, 3), np.uint8)
  for k in range(GRID * GRID):
    r, c = divmod(k, GRID)
    y0, y1 = r * height // GRID, (r + 1) * height // GRID
    x0, x1 = c * width // GRID, (c + 1) * width // GRID
    img[y0:y1, x0:x1] = 235 if (index >> k) & 1 else 20
  return img


def frame_index_of(rgb: np.ndarray) -> int:
  """Read back the index drawn by `frame_pattern` from an upright RGB frame of any size."""
  h, w = rgb.shape[:2]
  index = 0
  for k in range(GRID * GRID):
    r, c = divmod(k, GRID)
    cy, cx = int((r + 0.5) * h / GRID), int((c + 0.5) * w / GRID)
    patch = rgb[max(cy - h // 16, 0):cy + h // 16 + 1, max(cx - w // 16, 0):cx + w // 16 + 1]
    if patch.mean() > 127:
      index |= 1 << k
  return index


def write_video(path, *, num_frames: int, rate=30, width: int = 64, height: int = 36, codec: str = "libx264",
                pix_fmt: str = "yuv420p", gop: int | None = None, bframes: int | None = None,
                pts: list[int] | None = None, time_base: fractions.Fraction | None = None,
                rotation: int = 0, rotate_tag: int | None = None, audio: bool = False, options=None) -> str:
  """Encode frames 0..num_frames-1 (`frame_pattern`) into `path` (container from the extension).

  rate: frames per second (int, float or Fraction, e.g. Fraction(30000, 1001)). pts: explicit presentation
  times in `time_base` units (variable frame rate). rotation: counter-clockwise display rotation written as a
  display matrix; the stored pixels are the upright pattern turned the other way, so a correct reader sees the
  pattern upright. rotate_tag: a legacy clockwise `rotate` metadata tag instead (Matroska keeps it as a tag).
  audio: add a 440 Hz AAC (mp4) / Vorbis-free PCM (mkv) audio stream, interleaved."""
  path = os.fspath(path)
  rate = fractions.Fraction(rate).limit_denominator(1001) if not isinstance(rate, fractions.Fraction) else rate
  container = av.open(path, "w")
  stream = container.add_stream(codec, rate=rate)
  upright_w, upright_h = width, height
  turns = 0
  if rotation:
    turns = round(rotation / 90) % 4
    stream.set_display_rotation(rotation)
  if rotate_tag is not None:
    turns = round(-rotate_tag / 90) % 4
    stream.metadata["rotate"] = str(rotate_tag)
  if turns % 2:
    width, height = height, width  # stored size
  stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
  opts = dict(options or {})
  if codec == "libx264":
    opts.setdefault("preset", "ultrafast" if bframes is None else "veryfast")
    opts.setdefault("crf", "18")
  if gop is not None:
    stream.codec_context.gop_size = gop
    if codec == "libx264":
      opts["x264-params"] = f"keyint={gop}:min-keyint={gop}:scenecut=0"
  if bframes is not None:
    stream.codec_context.max_b_frames = bframes
  stream.options = opts
  if time_base is not None:
    stream.codec_context.time_base = time_base
    stream.time_base = time_base
  audio_stream = None
  if audio:
    audio_codec = "aac" if path.endswith((".mp4", ".mov", ".m4a")) else "pcm_s16le"
    audio_stream = container.add_stream(audio_codec, rate=16000)
    audio_stream.layout = "mono"
  samples_done = 0
  for i in range(num_frames):
    img = frame_pattern(i, upright_w, upright_h)
    if turns:
      img = np.ascontiguousarray(np.rot90(img, -turns))
    frame = av.VideoFrame.from_ndarray(img, format="rgb24")
    if pts is not None:
      frame.pts = pts[i]
      frame.time_base = time_base
    else:
      frame.pts = i
      frame.time_base = 1 / rate
    for packet in stream.encode(frame):
      container.mux(packet)
    if audio_stream is not None:
      t_end = (pts[i] * time_base if pts is not None else fractions.Fraction(i + 1) / rate)
      n = int(t_end * 16000) - samples_done
      if n > 0:
        _write_tone(container, audio_stream, samples_done, n)
        samples_done += n
  for packet in stream.encode():
    container.mux(packet)
  if audio_stream is not None:
    for packet in audio_stream.encode():
      container.mux(packet)
  container.close()
  return path


def _write_tone(container, stream, start: int, n: int) -> None:
  t = (np.arange(start, start + n) / 16000.0)
  pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)[None]
  fmt = "fltp" if stream.codec_context.name == "aac" else "s16"
  data = pcm.astype(np.float32) / 32768 if fmt == "fltp" else pcm
  frame = av.AudioFrame.from_ndarray(data, format=fmt, layout="mono")
  frame.sample_rate = 16000
  frame.pts = start
  for packet in stream.encode(frame):
    container.mux(packet)


def write_audio_only(path) -> str:
  """An m4a/mp4 file with one AAC audio stream and no video."""
  container = av.open(os.fspath(path), "w", format="mp4")
  stream = container.add_stream("aac", rate=16000)
  stream.layout = "mono"
  for k in range(10):
    _write_tone(container, stream, k * 1024, 1024)
  for packet in stream.encode():
    container.mux(packet)
  container.close()
  return os.fspath(path)


def write_truncated(src, path, keep: float = 0.5) -> str:
  """The first `keep` fraction of the bytes of `src` (an mp4 truncated this way loses its index: corrupt)."""
  data = open(src, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:int(len(data) * keep)])
  return os.fspath(path)


def write_garbage(path, size: int = 4096, seed: int = 0) -> str:
  """Random bytes with a video extension."""
  with open(path, "wb") as f:
    f.write(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
  return os.fspath(path)


def write_empty(path) -> str:
  open(path, "wb").close()
  return os.fspath(path)


def write_unsupported_codec(path, tmp_dir) -> str:
  """An AVI whose video FourCC is made up ('QVXX'): the container parses, no decoder exists for the codec."""
  src = write_video(os.path.join(tmp_dir, "_raw_for_fourcc.avi"), num_frames=3, codec="mpeg4")
  data = bytearray(open(src, "rb").read())
  strh = data.find(b"strh")
  vids = data.find(b"vids", strh)
  data[vids + 4:vids + 8] = b"QVXX"                       # strh.fccHandler
  strf = data.find(b"strf", vids)
  data[strf + 8 + 16:strf + 8 + 20] = b"QVXX"             # BITMAPINFOHEADER.biCompression
  with open(path, "wb") as f:
    f.write(bytes(data))
  os.remove(src)
  return os.fspath(path)


def vfr_pts(num_frames: int, pattern=(1, 2, 1, 3)) -> list[int]:
  """Presentation times (1/90 s units would be fine too; here 1/60 s ticks) with repeating uneven gaps."""
  out, t = [], 0
  for i in range(num_frames):
    out.append(t)
    t += pattern[i % len(pattern)]
  return out


def opencv_like_count(path) -> tuple[float, int]:
  """(FPS, frame count) as OpenCV's FFmpeg backend reports them, computed straight from PyAV metadata."""
  with av.open(os.fspath(path)) as c:
    s = c.streams.video[0]
    fps = float(s.average_rate)
    n = s.frames
    if n == 0:
      dur = c.duration / 1e6 if c.duration else float(s.duration * s.time_base)
      n = int(np.floor(dur * fps + 0.5))
    return fps, int(n)


def decode_all_indices(path) -> list[int]:
  """The pattern index of every frame in decoder output order (the ground truth of 'frame i')."""
  with av.open(os.fspath(path)) as c:
    return [frame_index_of(f.to_ndarray(format="rgb24")) for f in c.decode(c.streams.video[0])]


__all__ = ["frame_pattern", "frame_index_of", "write_video", "write_audio_only", "write_truncated",
           "write_garbage", "write_empty", "write_unsupported_codec", "vfr_pts", "opencv_like_count",
           "decode_all_indices"]


def make_test_videos(directory) -> dict[str, str]:
  """The standard decode test set in `directory` (about 2 s to encode): name -> path.

  cfr30 (10 s, 30 fps), ntsc (29.97 fps, 20 s), vfr (irregular timestamps, mp4), hd853 (853×480 MPEG-4),
  rot90 / rot270 / rot180 (display matrix), rotate_tag (legacy `rotate` tag in Matroska), audio (AAC track),
  long (430 s at 10 fps, 64×36, one keyframe per second), short (1.5 s), tiny (0.5 s), bframes (H.264 with
  B-pyramid), hevc (closed GOP), hevc_open (x265 open GOP), vp9 (WebM, no frame count in the header),
  mpeg4_bframes (AVI, MPEG-4 Part 2 with B-frames: open GOPs), annexb (H.264 with B-frames in MPEG-TS);
  broken: truncated, garbage, empty, audio_only, unsupported_codec, and `missing` (a path that does not exist).
  """
  d = os.fspath(directory)
  p = lambda name: os.path.join(d, name)  # noqa: E731
  x265 = {"x265-params": "log-level=error"}
  out = {
      "cfr30": write_video(p("cfr30.mp4"), num_frames=300, rate=30),
      "ntsc": write_video(p("ntsc.mp4"), num_frames=600, rate=fractions.Fraction(30000, 1001)),
      "vfr": write_video(p("vfr.mp4"), num_frames=240, rate=60, pts=vfr_pts(240),
                         time_base=fractions.Fraction(1, 60)),
      "hd853": write_video(p("hd853.mp4"), num_frames=90, codec="mpeg4", width=853, height=480),
      "rot90": write_video(p("rot90.mp4"), num_frames=60, rotation=90),
      "rot270": write_video(p("rot270.mp4"), num_frames=60, rotation=-90),
      "rot180": write_video(p("rot180.mp4"), num_frames=60, rotation=180),
      "rotate_tag": write_video(p("rotate_tag.mkv"), num_frames=60, rotate_tag=90),
      "audio": write_video(p("audio.mp4"), num_frames=90, audio=True),
      "long": write_video(p("long.mp4"), num_frames=4300, rate=10, gop=10),
      "short": write_video(p("short.mp4"), num_frames=45),
      "tiny": write_video(p("tiny.mp4"), num_frames=15),
      "bframes": write_video(p("bframes.mp4"), num_frames=300, bframes=3, gop=60),
      "hevc": write_video(p("hevc.mp4"), num_frames=150, codec="libx265", bframes=3, gop=50,
                          options={"x265-params": "log-level=error:open-gop=0"}),
      "hevc_open": write_video(p("hevc_open.mp4"), num_frames=150, codec="libx265", bframes=3, gop=50,
                               options=x265),
      "vp9": write_video(p("vp9.webm"), num_frames=90, codec="libvpx-vp9", options={"deadline": "realtime"}),
      "mpeg4_bframes": write_video(p("mpeg4_bframes.avi"), num_frames=150, codec="mpeg4", bframes=2, gop=50),
      "annexb": write_video(p("annexb.ts"), num_frames=150, bframes=3, gop=50),
  }
  out["truncated"] = write_truncated(out["cfr30"], p("truncated.mp4"))
  out["garbage"] = write_garbage(p("garbage.mp4"))
  out["empty"] = write_empty(p("empty.mp4"))
  out["audio_only"] = write_audio_only(p("audio_only.m4a"))
  out["unsupported_codec"] = write_unsupported_codec(p("unsupported.avi"), d)
  out["missing"] = p("does_not_exist.mp4")
  return out
