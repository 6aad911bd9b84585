"""Bad inputs raise BadSampleError with a specific reason (the loader skips and counts them)."""

import numpy as np
import pytest

import videos
from data_pipeline.errors import BadSampleError
from data_pipeline.image import read_image_crops
from data_pipeline.video import probe_video, read_video


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
  d = tmp_path_factory.mktemp("broken")
  good = videos.write_video(d / "good.mp4", num_frames=90)
  return {
      "good": good,
      "missing": str(d / "nope.mp4"),
      "empty": videos.write_empty(d / "empty.mp4"),
      "garbage": videos.write_garbage(d / "garbage.mp4"),
      "truncated": videos.write_truncated(good, d / "truncated.mp4", keep=0.6),
      "audio_only": videos.write_audio_only(d / "audio.m4a"),
      "unsupported": videos.write_unsupported_codec(d / "unsupported.avi", d),
      "tiny": videos.write_video(d / "tiny.mp4", num_frames=15),
      "directory": str(d),
  }


@pytest.mark.parametrize("name, reason", [
    ("missing", "missing_file"),
    ("directory", "missing_file"),
    ("empty", "empty_file"),
    ("garbage", "corrupt"),
    ("truncated", "corrupt"),       # an mp4 cut before its moov index
    ("audio_only", "no_video_stream"),
    ("unsupported", "unsupported_codec"),
    ("tiny", "too_few_frames"),     # 0.5 s: no 1-fps frame, one 2-fps frame
])
def test_bad_video_reason(broken, name, reason):
  with pytest.raises(BadSampleError) as info:
    read_video(broken[name], image_size=32)
  assert info.value.reason == reason
  assert str(broken[name]) in str(info.value)  # the message names the file


def test_bad_bytes(broken):
  with pytest.raises(BadSampleError, match="empty") as info:
    read_video(b"")
  assert info.value.reason == "empty_file"
  with pytest.raises(BadSampleError) as info:
    read_video(open(broken["garbage"], "rb").read())
  assert info.value.reason == "corrupt" and info.value.source == "<bytes>"


def test_probe_reports_the_same_reasons(broken):
  with pytest.raises(BadSampleError) as info:
    probe_video(broken["audio_only"])
  assert info.value.reason == "no_video_stream"
  assert probe_video(broken["good"]).frame_count == 90


def test_corrupted_payload_still_yields_frames_or_a_reason(broken, tmp_path):
  """Bytes scrambled inside the media data: either some decodable frames or a BadSampleError, never a crash."""
  data = bytearray(open(broken["good"], "rb").read())
  rng = np.random.default_rng(0)
  start = data.find(b"mdat") + 8
  for pos in rng.integers(start, start + (len(data) - start) // 2, 200):
    data[pos] = rng.integers(0, 256)
  path = tmp_path / "scrambled.mp4"
  path.write_bytes(bytes(data))
  try:
    clip = read_video(str(path), image_size=32)
  except BadSampleError as e:
    assert e.reason in ("corrupt", "zero_frames", "too_few_frames")
  else:
    assert clip.frames.shape[1:] == (32, 32, 3) and len(clip.indices) >= 2


def test_no_frame_at_the_sampled_indices(tmp_path):
  """A Matroska file cut after its 4th frame: the header claims 300 frames, nothing decodes at 15 (or 7, 22)."""
  full = videos.write_video(tmp_path / "full.mkv", num_frames=300)
  cut = videos.write_truncated(full, tmp_path / "cut.mkv", keep=0.05)
  assert len(videos.decode_all_indices(cut)) == 4
  with pytest.raises(BadSampleError) as info:
    read_video(cut)
  assert info.value.reason == "zero_frames"


def test_stream_without_frames(tmp_path):
  import av
  path = str(tmp_path / "noframes.mkv")
  with av.open(path, "w") as c:
    s = c.add_stream("libx264", rate=30)
    s.width, s.height, s.pix_fmt = 64, 36, "yuv420p"
    c.start_encoding()
  with pytest.raises(BadSampleError) as info:
    read_video(path)
  assert info.value.reason == "corrupt"


@pytest.mark.parametrize("name, reason", [("missing", "missing_file"), ("empty", "empty_file"),
                                          ("garbage", "bad_image")])
def test_bad_images(broken, name, reason):
  with pytest.raises(BadSampleError) as info:
    read_image_crops(broken[name])
  assert info.value.reason == reason
