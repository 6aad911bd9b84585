"""Against OpenCV itself (the reference's reader): pixels of every pixel format / range, the frame numbering of
a clip of a variable-frame-rate video, and what a one-frame video and a text-only sample give."""

import fractions
import json

import av
import cv2
import numpy as np
import pytest

import videos
from data_pipeline import loader
from data_pipeline.errors import BadSampleError
from data_pipeline.preprocess import normalize
from data_pipeline.tokenizer import build_tiny_tokenizer
from data_pipeline.video import read_video, sample_frame_indices



def opencv_reference(path, num_frames=420, fps=1.0, start_sec=None, end_sec=None, auto_rotate=False):
  """SPEC §1.1 with cv2 as the reference runs it: seek with CAP_PROP_POS_FRAMES to the first sampled index,
  read on, keep the sampled numbers, BGR -> RGB. Returns (indices, RGB frames). `auto_rotate`: turn on
  CAP_PROP_ORIENTATION_AUTO (the pinned 4.11 wheel leaves it off; we always return upright frames)."""
  cap = cv2.VideoCapture(str(path))
  if auto_rotate:
    assert cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
  indices = sample_frame_indices(cap.get(cv2.CAP_PROP_FPS), cap.get(cv2.CAP_PROP_FRAME_COUNT), num_frames, fps,
                                 start_sec, end_sec)
  cap.set(cv2.CAP_PROP_POS_FRAMES, float(indices[0]))
  kept, frames, number = [], [], indices[0]
  ok, bgr = cap.read()
  while ok and number <= indices[-1]:
    if number in indices:
      kept.append(number)
      frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    ok, bgr = cap.read()
    number += 1
  cap.release()
  return kept, np.stack(frames) if frames else np.zeros((0,), np.uint8)


def write_colourful(path, codec, pix_fmt, full_range, num_frames=60, width=64, height=48):
  """Sharp colour edges (worst case for chroma interpolation), noise and gradients, 30 fps."""
  container = av.open(str(path), "w")
  stream = container.add_stream(codec, rate=30)
  stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
  if full_range:
    stream.codec_context.color_range = av.video.reformatter.ColorRange.JPEG
  stream.options = ({"preset": "ultrafast", "crf": "16"} if codec == "libx264"
                    else {"crf": "16", "x265-params": "log-level=error"})
  rng = np.random.default_rng(0)
  for i in range(num_frames):
    img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    img[: height // 2] = np.linspace(0, 255, width)[None, :, None].astype(np.uint8)
    img[: height // 4, :, (i % 3)] = 255 - img[: height // 4, :, (i % 3)]
    frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format=pix_fmt,
                                                                     dst_color_range=2 if full_range else 1)
    frame.pts = i
    for packet in stream.encode(frame):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()
  return str(path)


FORMATS = [(codec, pix_fmt, full) for codec in ("libx264", "libx265")
           for pix_fmt in ("yuv420p", "yuv420p10le", "yuv444p", "yuv444p10le") for full in (False, True)]


@pytest.mark.parametrize("codec, pix_fmt, full_range", FORMATS)
def test_pixels_equal_opencv(tmp_path, codec, pix_fmt, full_range):
  path = write_colourful(tmp_path / "c.mp4", codec, pix_fmt, full_range)
  want_indices, want = opencv_reference(path)
  clip = read_video(path, resize=False)
  assert clip.indices == want_indices
  assert clip.frames.shape == want.shape
  np.testing.assert_array_equal(clip.frames, want)  # 0 levels of difference


def test_standard_set_equals_opencv(tmp_path):
  """Other codecs and structures against cv2: B-frames, HEVC open GOPs, odd-sized VP9, MJPEG (yuvj422p), 10-bit
  FFV1, MPEG-4 Part 2 and a display-matrix rotation."""
  vids = {name: videos.write_video(tmp_path / f"{name}.{ext}", **kw) for name, ext, kw in [
      ("bframes", "mp4", dict(num_frames=150, bframes=3, gop=60)),
      ("hevc_open", "mp4", dict(num_frames=90, codec="libx265", bframes=3, gop=30,
                                options={"x265-params": "log-level=error"})),
      ("vp9_odd", "webm", dict(num_frames=60, codec="libvpx-vp9", width=65, height=37,  # odd: swscale's filter path
                               options={"deadline": "realtime"})),
      ("mjpeg", "avi", dict(num_frames=60, codec="mjpeg", pix_fmt="yuvj422p")),
      ("ffv1_10bit", "mkv", dict(num_frames=60, codec="ffv1", pix_fmt="yuv420p10le")),
      ("mpeg4", "avi", dict(num_frames=60, codec="mpeg4", width=86, height=48)),
      ("rot90", "mp4", dict(num_frames=60, rotation=90)),
  ]}
  for name, path in vids.items():
    want_indices, want = opencv_reference(path, auto_rotate=name.startswith("rot"))
    clip = read_video(path, resize=False)
    assert clip.indices == want_indices, name
    np.testing.assert_array_equal(clip.frames, want, err_msg=name)


def vfr_issue_video(path, pattern, **kw):
  """200 frames 20-100 ms apart (1 ms ticks), a keyframe every 30 frames."""
  gaps = {"random": np.random.default_rng(3).integers(20, 101, 200),
          "slow_then_fast": np.where(np.arange(200) < 60, 100, 20),
          "fast_then_slow": np.where(np.arange(200) < 60, 20, 100)}[pattern]
  pts = [0] + [int(t) for t in np.cumsum(gaps)[:-1]]
  return videos.write_video(path, num_frames=200, pts=pts, time_base=fractions.Fraction(1, 1000), gop=30, **kw)


@pytest.mark.parametrize("pattern", ["random", "slow_then_fast", "fast_then_slow"])
@pytest.mark.parametrize("start_sec, end_sec", [(3.0, 8.0), (5.0, 9.0)])
def test_vfr_clip_numbers_frames_like_opencv(tmp_path, pattern, start_sec, end_sec):
  path = vfr_issue_video(tmp_path / "vfr.mp4", pattern)
  want_indices, want = opencv_reference(path, start_sec=start_sec, end_sec=end_sec)
  for strategy in ("auto", "sequential"):
    clip = read_video(path, start_sec=start_sec, end_sec=end_sec, resize=False, strategy=strategy)
    assert clip.indices == want_indices
    np.testing.assert_array_equal(clip.frames, want)
  positions = read_video(path, start_sec=start_sec, end_sec=end_sec, resize=False, opencv_seek=False)
  assert [videos.frame_index_of(f) for f in positions.frames] == positions.indices  # the documented opt-out


@pytest.mark.parametrize("name", ["b.mp4", "b.mkv"])
def test_vfr_clip_with_bframes_like_opencv(tmp_path, name):
  """B-frames: decode timestamps differ from presentation ones (mp4 seeks by the index, Matroska by cues)."""
  path = vfr_issue_video(tmp_path / name, "fast_then_slow", bframes=3)
  want_indices, want = opencv_reference(path, start_sec=2.0, end_sec=12.0)
  clip = read_video(path, start_sec=2.0, end_sec=12.0, resize=False)
  assert clip.indices == want_indices
  np.testing.assert_array_equal(clip.frames, want)


def test_vfr_clip_differs_from_decode_positions(tmp_path):
  """The case above that shows the effect: OpenCV's frame i is not the i-th picture here."""
  path = vfr_issue_video(tmp_path / "vfr.mp4", "fast_then_slow")
  clip = read_video(path, start_sec=3.0, end_sec=8.0, image_size=32)
  shown = [videos.frame_index_of(f) for f in clip.frames]
  assert shown != clip.indices
  # OpenCV lands on keyframe 60 (shown at 59 * 20 ms) and numbers it from its time: int(FPS * 1.18 + 0.5)
  offset = 60 - int(clip.native_fps * 1.18 + 0.5)
  assert offset > 0 and shown == [i + offset for i in clip.indices]


def test_one_frame_video_is_too_few_frames(tmp_path):
  path = videos.write_video(tmp_path / "one.mp4", num_frames=1)
  with pytest.raises(BadSampleError) as info:
    read_video(path, image_size=32)
  assert info.value.reason == "too_few_frames"


@pytest.mark.parametrize("normalize_on_host", [False, True])
def test_text_only_dummy_image_is_mid_grey(tmp_path, normalize_on_host):
  tok = build_tiny_tokenizer(["Say hi. hi"], tmp_path / "tok.json")
  settings = loader.SampleSettings(image_size=32, max_frames=8, fps=1.0, template="qwen2", tokenizer_path=tok,
                                   max_text_len=128, max_images=4, max_bucket=8, normalize_on_host=normalize_on_host)
  record = {"error": b"", "error_detail": b"", "modality": b"text", "media": [], "start": float("nan"),
            "end": float("nan"), "origin": b"t.jsonl", "id": b"t0",
            "conversations": json.dumps([{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}])}
  frames = loader.SampleProcessor(None, settings).process(record)["frames"]
  assert frames.shape == (1, 32, 32, 3)
  pixels = frames if normalize_on_host else normalize(frames)
  if normalize_on_host:
    assert frames.dtype == np.float32 and not frames.any()  # exactly the reference's 0.0
  else:
    assert frames.dtype == np.uint8 and np.abs(pixels).max() <= 1 / 255 + 1e-7  # nearest uint8 to 0.0
