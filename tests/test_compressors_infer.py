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
  assert seen["visual"] <= visual_token_bound(model.config.model, seen["frames"])


def nnx_compressor(model):
  from flax import nnx
  return nnx.merge(model.graphdef, model.state).compressor
