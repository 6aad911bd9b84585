"""Frame sampling (SPEC §1.1) against a loop written directly from the SPEC text, plus hand-worked cases."""

import math

import hypothesis
import hypothesis.strategies as st
import pytest

from data_pipeline.video import frame_timestamps, sample_frame_indices


def spec_indices(FPS, FCOUNT, num_frames, fps=1.0, start_sec=None, end_sec=None):
  """SPEC §1.1 steps 1-4, transcribed from the text."""
  fps = min(fps, FPS)                                                   # step 1
  start_idx = round(FPS * start_sec) if start_sec is not None else 0    # step 2
  end_idx = round(FPS * end_sec) if end_sec is not None else int(FCOUNT - 1)
  candidates = []                                                       # step 3
  for i in range(start_idx, end_idx + 1, round(FPS)):
    for j in range(round(fps)):
      candidates.append(int(i + j * FPS / fps + FPS / (2 * fps)))
  if num_frames is not None:                                            # step 4: uniform_sample
    gap = len(candidates) / num_frames
    keep = sorted(set(int(k * gap + gap / 2) for k in range(num_frames)))
    candidates = [candidates[k] for k in keep]
  return candidates


def test_30fps_one_frame_from_the_middle_of_each_second():
  assert sample_frame_indices(30.0, 300, 420) == [15, 45, 75, 105, 135, 165, 195, 225, 255, 285]
  assert frame_timestamps([15, 45, 285], 30.0) == [0.5, 1.5, 9.5]


def test_2997fps_drifts_because_the_step_is_round_fps():
  fps = 30000 / 1001
  got = sample_frame_indices(fps, 600, 420)
  assert got[:3] == [14, 44, 74]          # int(0 + 14.985) = 14, then steps of 30, not 29.97
  assert got[-1] == 584 and len(got) == 20
  ts = frame_timestamps(got, fps)
  assert ts[0] == 0.5 and ts[-1] == 19.5   # 14 / 29.97 = 0.467, 584 / 29.97 = 19.486


def test_long_video_is_uniformly_subsampled_to_num_frames():
  got = sample_frame_indices(10.0, 4300, 420)  # 430 one-per-second candidates i + 5
  assert len(got) == 420
  assert got[0] == 5 and got[-1] == 4295  # k = 419: int(419 * 430/420 + 215/420) = 429 -> 4290 + 5
  assert got == spec_indices(10.0, 4300, 420)


def test_short_video_keeps_every_candidate_without_padding():
  assert sample_frame_indices(30.0, 45, 420) == [15, 45]  # 45 is past the end: the reader drops it
  assert sample_frame_indices(30.0, 45, 420, fps=2.0) == [7, 22, 37, 52]


def test_start_and_end_seconds():
  # start 2 s, end 5 s at 30 fps: i in range(60, 151, 30) -> +15
  assert sample_frame_indices(30.0, 300, 420, start_sec=2.0, end_sec=5.0) == [75, 105, 135, 165]


def test_num_frames_none_keeps_all_one_fps_frames():
  assert sample_frame_indices(25.0, 251, None) == [12 + 25 * k for k in range(11)]  # int(i + 12.5)


def test_fps_above_native_is_clamped():
  assert sample_frame_indices(1.0, 5, 420, fps=4.0) == [0, 1, 2, 3, 4]  # fps = min(4, 1): int(i + 0.5)


def test_empty_video_gives_no_indices():
  assert sample_frame_indices(30.0, 0, 420) == []


def test_sub_half_fps_video_gives_nothing_instead_of_crashing():
  # the reference's range step round(0.4) = 0 raises; with step 1, round(fps = min(1, 0.4)) = 0 frames per second
  assert sample_frame_indices(0.4, 3, 420, fps=1.0) == []
  assert sample_frame_indices(0.75, 4, 420) == [0, 1, 2, 3]  # round(.75) = 1: int(i + 0.375)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    FPS=st.one_of(st.sampled_from([23.976, 24.0, 25.0, 29.97, 30000 / 1001, 30.0, 50.0, 59.94, 60.0, 120.0]),
                  st.floats(0.5, 240.0, allow_nan=False)),
    FCOUNT=st.integers(0, 50_000),
    num_frames=st.one_of(st.none(), st.integers(1, 600)),
    fps=st.sampled_from([1.0, 2.0, 3.0]),
)
def test_matches_the_spec_loop(FPS, FCOUNT, num_frames, fps):
  hypothesis.assume(round(FPS) >= 1)
  expected = spec_indices(FPS, FCOUNT, num_frames, fps) if FCOUNT > 0 else []
  got = sample_frame_indices(FPS, FCOUNT, num_frames, fps)
  assert got == sorted(set(expected))
  if num_frames is not None:
    assert len(got) <= num_frames
  assert frame_timestamps(got, FPS) == [round(i / FPS, 1) for i in got]


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(FPS=st.floats(1.0, 120.0), start=st.floats(0.1, 100.0), length=st.floats(0.1, 100.0))
def test_matches_the_spec_loop_with_bounds(FPS, start, length):
  expected = spec_indices(FPS, 100_000, 420, 1.0, start, start + length)
  assert sample_frame_indices(FPS, 100_000, 420, 1.0, start, start + length) == sorted(set(expected))


def test_bad_native_fps_is_rejected():
  for bad in (0.0, -1.0, math.nan, math.inf):
    with pytest.raises(ValueError, match="native_fps"):
      sample_frame_indices(bad, 100, 420)


def test_config_validates_decode_fields():
  from configs.quicksviewer import get_config
  from qv_jax.config import ConfigError, validate
  config = get_config("size=tiny")
  validate(config)
  assert (config.data.min_frames, config.data.decode_strategy) == (2, "auto")
  for field, bad in (("fps", 0.5), ("decode_strategy", "fast"), ("min_frames", 0), ("decode_threads", -1)):
    config = get_config("size=tiny")
    setattr(config.data, field, bad)
    with pytest.raises(ConfigError, match=f"data.{field}"):
      validate(config)
