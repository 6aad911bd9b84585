"""Decoding self-encoded videos: the sampled indices and timestamps follow SPEC §1.1, the returned frames are
exactly those frames (each frame draws its own index), upright, and every decode strategy agrees."""

import fractions
import os
import subprocess
import sys

import numpy as np
import pytest

import videos
from data_pipeline.errors import BadSampleError
from data_pipeline.preprocess import normalize, resize_frames
from data_pipeline.video import frame_timestamps, probe_video, read_video, sample_frame_indices
from test_video_sampling import spec_indices


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
  return videos.make_test_videos(tmp_path_factory.mktemp("videos"))


def drawn_indices(frames):
  return [videos.frame_index_of(f) for f in frames]


def check_against_spec(clip, path, num_frames=420, fps=1.0):
  FPS, FCOUNT = videos.opencv_like_count(path)
  decodable = len(videos.decode_all_indices(path))
  expected = [i for i in spec_indices(FPS, FCOUNT, num_frames, fps) if i < decodable]
  assert clip.native_fps == pytest.approx(FPS, abs=1e-9) and clip.frame_count == FCOUNT
  assert clip.indices == expected
  assert clip.timestamps == [round(i / FPS, 1) for i in expected]
  assert drawn_indices(clip.frames) == expected


def test_30fps(vids):
  clip = read_video(vids["cfr30"], image_size=48)
  assert clip.indices == [15, 45, 75, 105, 135, 165, 195, 225, 255, 285]
  assert clip.timestamps == [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5]
  assert clip.frames.shape == (10, 48, 48, 3) and clip.frames.dtype == np.uint8
  check_against_spec(clip, vids["cfr30"])


def test_2997fps(vids):
  clip = read_video(vids["ntsc"], image_size=48)
  assert clip.native_fps == pytest.approx(30000 / 1001) and clip.frame_count == 600
  assert clip.indices == [i + 14 for i in range(0, 600, 30)]
  assert clip.timestamps[:3] == [0.5, 1.5, 2.5] and clip.timestamps[-1] == 19.5
  check_against_spec(clip, vids["ntsc"])


def test_variable_frame_rate_counts_frames_in_decode_order(vids):
  clip = read_video(vids["vfr"], image_size=48)
  check_against_spec(clip, vids["vfr"])
  # frame i is the i-th decoded frame, not the frame shown at time i / FPS
  FPS = clip.native_fps
  pts = videos.vfr_pts(240)
  by_time = [int(np.searchsorted(np.asarray(pts) / 60, i / FPS, side="right") - 1) for i in clip.indices]
  assert by_time != clip.indices


def test_853x480_mpeg4(vids):
  clip = read_video(vids["hd853"], resize=False)
  assert clip.frames.shape == (3, 480, 853, 3)
  assert clip.indices == [15, 45, 75]
  assert drawn_indices(clip.frames) == [15, 45, 75]
  resized = read_video(vids["hd853"])
  assert resized.frames.shape == (3, 384, 384, 3)
  np.testing.assert_array_equal(resized.frames, resize_frames(clip.frames, 384))


@pytest.mark.parametrize("name", ["rot90", "rot270", "rot180", "rotate_tag"])
def test_rotated_videos_come_out_upright(vids, name):
  clip = read_video(vids[name], resize=False)
  assert clip.frames.shape == (2, 36, 64, 3)  # the upright picture is 64 wide, 36 high
  assert drawn_indices(clip.frames) == [15, 45]
  wrong = [videos.frame_index_of(np.rot90(f, 1)) for f in clip.frames]  # the check can tell orientations apart
  assert wrong != [15, 45]


def test_audio_stream_is_ignored(vids):
  clip = read_video(vids["audio"], image_size=48)
  assert clip.indices == [15, 45, 75]
  check_against_spec(clip, vids["audio"])


def test_long_video_420_frames(vids):
  clip = read_video(vids["long"], image_size=32)
  assert len(clip.indices) == 420 and clip.frames.shape == (420, 32, 32, 3)
  assert clip.indices[0] == 5 and clip.indices[-1] == 4295
  assert clip.timestamps[0] == 0.5 and clip.timestamps[-1] == 429.5
  check_against_spec(clip, vids["long"])


def test_long_video_sparse_sampling_seeks(vids, monkeypatch):
  from data_pipeline import video as video_module
  seeks = []
  original = video_module._GopReader.seek
  monkeypatch.setattr(video_module._GopReader, "seek", lambda self, ts: (seeks.append(ts), original(self, ts)))
  clip = read_video(vids["long"], num_frames=12, image_size=32)
  assert len(seeks) >= 10  # GOPs of 10 packets, samples ~360 packets apart
  check_against_spec(clip, vids["long"], num_frames=12)


def test_short_video_retries_at_two_fps(vids):
  clip = read_video(vids["short"], image_size=32)
  # 1 fps: [15, 45], 45 is past the 45-frame end -> 1 frame < 2 -> fps 2: int(i + 7.5), int(i + 22.5)
  assert clip.indices == [7, 22, 37]
  assert clip.timestamps == [0.2, 0.7, 1.2]
  assert drawn_indices(clip.frames) == [7, 22, 37]


def test_min_frames_one_keeps_the_single_frame(vids):
  assert read_video(vids["short"], image_size=32, min_frames=1).indices == [15]


def test_start_end_seconds(vids):
  clip = read_video(vids["cfr30"], image_size=32, start_sec=2.0, end_sec=5.0)
  assert clip.indices == [75, 105, 135, 165]
  assert drawn_indices(clip.frames) == [75, 105, 135, 165]


def test_num_frames_none_and_small(vids):
  assert read_video(vids["cfr30"], num_frames=None, image_size=32).indices == list(range(15, 300, 30))
  clip = read_video(vids["cfr30"], num_frames=4, image_size=32)
  assert clip.indices == [45, 105, 195, 255]  # gap 2.5: k*2.5 + 1.25 -> 1, 3, 6, 8


@pytest.mark.parametrize("strategy", ["auto", "scan"])
@pytest.mark.parametrize("name", ["bframes", "hevc", "hevc_open", "vp9", "vfr", "long", "rot90", "hd853",
                                  "mpeg4_bframes", "annexb"])
def test_strategies_agree_pixel_for_pixel(vids, name, strategy):
  """GOP skipping, non-reference dropping and seeking give exactly the frames a full sequential decode gives."""
  kwargs = dict(num_frames=420 if name != "long" else 37, resize=False)
  fast = read_video(vids[name], strategy=strategy, **kwargs)
  slow = read_video(vids[name], strategy="sequential", **kwargs)
  assert fast.indices == slow.indices and len(fast.indices) >= 2
  np.testing.assert_array_equal(fast.frames, slow.frames)
  assert drawn_indices(fast.frames) == fast.indices


@pytest.mark.parametrize("name, total", [("hevc_open", 150), ("mpeg4_bframes", 150)])
def test_open_gop_streams_decode_a_subset(vids, monkeypatch, name, total):
  from data_pipeline import video as video_module
  with pytest.raises(BadSampleError, match="open GOP"):
    read_video(vids[name], image_size=32, strategy="gop")
  sent = []
  original = video_module._send
  monkeypatch.setattr(video_module, "_send", lambda stream, packet: (sent.append(packet), original(stream, packet))[1])
  clip = read_video(vids[name], num_frames=3, image_size=32, strategy="scan")
  assert drawn_indices(clip.frames) == clip.indices == [15, 75, 135]
  assert len([p for p in sent if p is not None]) < total * 0.8


def test_non_reference_pictures_are_dropped(vids, monkeypatch):
  import av
  from data_pipeline import video as video_module
  with av.open(vids["bframes"]) as c:
    droppable = video_module._droppable_fn(c.streams.video[0])
    flags = [droppable(p) for p in c.demux(c.streams.video[0]) if p.size]
  assert 0 < sum(flags) < len(flags)  # the B-pyramid stream has disposable pictures
  sent = []
  original = video_module._send
  monkeypatch.setattr(video_module, "_send", lambda stream, packet: (sent.append(packet), original(stream, packet))[1])
  clip = read_video(vids["bframes"], resize=False, strategy="gop")
  assert drawn_indices(clip.frames) == clip.indices == list(range(15, 300, 30))
  decoded = [p for p in sent if p is not None]
  # frames after index 285 are never needed, and unsampled disposable pictures are skipped
  assert len(decoded) <= 300 - sum(flags[:286]) + len(clip.indices)


def test_bytes_equal_path_and_threads_do_not_matter(vids):
  path = vids["bframes"]
  a = read_video(path, image_size=48)
  b = read_video(open(path, "rb").read(), image_size=48, threads=2)
  assert a.indices == b.indices and a.timestamps == b.timestamps
  np.testing.assert_array_equal(a.frames, b.frames)


def test_pixels_match_the_siglip_processor(vids):
  """resize + normalize give bit-for-bit what SiglipImageProcessor (PIL backend) gives the reference."""
  from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
  processor = SiglipImageProcessorPil(size={"height": 384, "width": 384}, resample=3, do_rescale=True,
                                      rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3)
  raw = read_video(vids["hd853"], resize=False).frames
  ours = normalize(read_video(vids["hd853"]).frames)
  theirs = np.stack([processor(f, return_tensors="np")["pixel_values"][0] for f in raw]).transpose(0, 2, 3, 1)
  assert ours.dtype == np.float32 and ours.min() >= -1 and ours.max() <= 1
  np.testing.assert_array_equal(ours, theirs)


def test_probe_matches_opencv_conventions(vids):
  info = probe_video(vids["cfr30"])
  assert (info.native_fps, info.frame_count, info.width, info.height) == (30.0, 300, 64, 36)
  webm = probe_video(vids["vp9"])  # no frame count in a WebM header: floor(duration * FPS + 0.5)
  assert webm.frame_count == 90 and webm.native_fps == 30.0
  assert probe_video(vids["ntsc"]).native_fps == pytest.approx(29.97002997)


def test_truncated_matroska_keeps_the_frames_before_the_cut(tmp_path):
  src = videos.write_video(tmp_path / "full.mkv", num_frames=300)
  cut = videos.write_truncated(src, tmp_path / "cut.mkv", keep=0.5)
  clip = read_video(cut, image_size=32)
  assert clip.frame_count == 300  # the header still claims the full length
  assert 2 <= len(clip.indices) < 10 and clip.indices == [15 + 30 * k for k in range(len(clip.indices))]
  assert drawn_indices(clip.frames) == clip.indices


def test_timestamps_helper():
  assert frame_timestamps([0, 14, 584], 30000 / 1001) == [0.0, 0.5, 19.5]
  assert sample_frame_indices(30.0, 300, 420)[:2] == [15, 45]


def test_inspect_cli(vids, tmp_path):
  from data_pipeline.tokenizer import build_tiny_tokenizer
  tok = build_tiny_tokenizer(["Describe the video 0.5 1.5"], tmp_path / "tok.json")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-m", "data_pipeline.inspect_video", vids["short"], "--question", "What?",
                        "--tokenizer", tok], capture_output=True, text=True, env=env, timeout=120)
  assert run.returncode == 0, run.stderr
  import json
  out = json.loads(run.stdout)
  assert out["indices"] == [7, 22, 37] and out["timestamps"] == [0.2, 0.7, 1.2]
  assert out["native_fps"] == 30.0 and out["frame_count"] == 45
  assert out["prompt"] == ("<|im_start|>user\n<video_start><thumbnail_start><image><thumbnail_end>0.2<image>0.7"
                           "<image>1.2<image><video_end>\nWhat?<|im_end|>\n<|im_start|>assistant\n")
  assert out["num_placeholders"] == 4 and out["num_tokens"] > 20
  bad = subprocess.run([sys.executable, "-m", "data_pipeline.inspect_video", vids["garbage"]], capture_output=True,
                       text=True, env=env, timeout=120)
  assert bad.returncode == 2 and "corrupt" in bad.stderr


def test_fraction_rates_round_trip(tmp_path):
  path = videos.write_video(tmp_path / "r24.mp4", num_frames=72, rate=fractions.Fraction(24000, 1001))
  clip = read_video(path, image_size=32)
  assert clip.indices == [11, 35, 59]  # int(i + 11.988)
  assert drawn_indices(clip.frames) == [11, 35, 59]


def test_oversized_gop_falls_back_to_sequential(vids, monkeypatch):
  from data_pipeline import video as video_module
  monkeypatch.setattr(video_module, "MAX_GOP_BYTES", 2000)
  with pytest.raises(BadSampleError):
    read_video(vids["bframes"], image_size=32, strategy="gop")
  clip = read_video(vids["bframes"], image_size=32)  # auto: sequential
  assert drawn_indices(clip.frames) == clip.indices == list(range(15, 300, 30))
