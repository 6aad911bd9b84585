"""Every compressor kind answers through the inference API (qv_jax.infer) on a tiny random model, with the
prompt's visual tokens within the kind's budget."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from infer_fixtures import make_video, make_workdir, one_device_mesh  # noqa: E402

from qv_jax.infer import answer, load  # noqa: E402
from qv_jax.infer import runner  # noqa: E402
from qv_jax.model.compressors.registry import visual_token_bound  # noqa: E402


@pytest.fixture(scope="module")
def video(tmp_path_factory):
  path, _ = make_video(str(tmp_path_factory.mktemp("kinds") / "a.mp4"), seconds=10, seed=3)
  return path


@pytest.mark.slow
@pytest.mark.parametrize("kind,extra", [
    ("uniform", {}), ("score_gating", {"keep_ratio": 0.2}),
    ("question_select", {"select_frames": 3, "segment_frames": 4}),
    ("question_select", {"select_frames": 3, "segment_frames": 4, "select_tokens": "cubes"})])
def test_kind_answers_through_the_api(tmp_path, video, kind, extra, monkeypatch):
  workdir = make_workdir(str(tmp_path / "work"), compressor=dict(kind=kind, **extra))
  model = load(workdir, mesh=one_device_mesh())
  assert type(nnx_compressor(model)).__module__.endswith(kind)
  seen = {}
  prepare = runner.prepare

  def spy(m, batch):
    out = prepare(m, batch)
    seen["visual"] = int(np.asarray(out.length)[0]) - int(np.asarray(batch["token_valid"])[0].sum())
    seen["frames"] = batch["frames"].shape[1]
    return out

  monkeypatch.setattr(runner, "prepare", spy)
  result = answer(model, video, "What colour is the first shape?", max_new_tokens=4, num_frames=12)
  assert result.error is None and isinstance(result.text, str) and 1 <= len(result.token_ids) <= 4
  # the merged length minus the pre-merge text (placeholders included) is bounded by the kind's budget
  assert seen["visual"] <= visual_token_bound(model.config.model.compressor, seen["frames"])


def nnx_compressor(model):
  from flax import nnx
  return nnx.merge(model.graphdef, model.state).compressor


@pytest.mark.slow
def test_timeline_shows_the_kept_tokens_of_score_gating(tmp_path, video, capsys):
  import json
  from qv_jax.infer import cli_timeline
  from qv_jax.model.compressors.score_gating import budget_tokens
  workdir = make_workdir(str(tmp_path / "work"), compressor=dict(kind="score_gating", keep_ratio=0.2))
  out = tmp_path / "timeline"
  assert cli_timeline.main([video, "--checkpoint", workdir, "--out", str(out), "--num-frames", "12"]) == 0
  timeline = json.loads((out / "timeline.json").read_text())
  assert (out / "timeline.png").stat().st_size > 0
  c = load(workdir, mesh=one_device_mesh()).config
  n, q = timeline["num_frames"], int(c.model.compressor.num_queries)
  k = budget_tokens(runner.frame_bucket(n, tuple(c.data.frame_buckets)), q, 0.2)
  assert timeline["kind"] == "score_gating" and timeline["budget_tokens"] == k and "cubes" not in timeline
  assert len(timeline["kept_tokens"]) == n and sum(timeline["kept_tokens"]) == min(k, n * q)
  assert all(0 <= t <= q for t in timeline["kept_tokens"])
  # the frames it keeps tokens of are the frames the answer's prompt holds
  got = answer(load(workdir, mesh=one_device_mesh()), video, "What is shown?", max_new_tokens=2, num_frames=12)
  assert [cube.start_frame for cube in got.cubes] == [i for i, t in enumerate(timeline["kept_tokens"]) if t]
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kept_tokens"] == timeline["kept_tokens"]


@pytest.mark.slow
def test_timeline_uniform_cubes_and_question_select_refused(tmp_path, video, capsys):
  from qv_jax.infer import cli_timeline
  from qv_jax.infer.timeline import compute_timeline, uniform_starts
  workdir = make_workdir(str(tmp_path / "uniform"), compressor=dict(kind="uniform"))
  timeline, _ = compute_timeline(load(workdir, mesh=one_device_mesh()), video, num_frames=12)
  assert timeline["kind"] == "uniform"
  assert [c["start_frame"] for c in timeline["cubes"]] == uniform_starts(timeline["num_frames"], 5)
  workdir = make_workdir(str(tmp_path / "qs"), compressor=dict(kind="question_select", select_frames=3,
                                                                segment_frames=4))
  capsys.readouterr()
  assert cli_timeline.main([video, "--checkpoint", workdir, "--out", str(tmp_path / "t")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "question_select" in err[0] and not (tmp_path / "t" / "timeline.png").exists()
