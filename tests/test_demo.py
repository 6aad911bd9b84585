"""The CPU demo's parts: procedural videos whose cuts match the decoded 1-fps frames, the boundary scores,
the Colab notebook's format, the launchers' syntax, and (slow) the whole demo in its quick mode."""

import json
import os
import subprocess

import numpy as np
import pytest

from data_pipeline import synthetic
from qv_jax.infer.scene_eval import boundary_matches, caption_scores, scores, uniform_starts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_schedules_have_one_segment_per_cube_and_varied_lengths():
  rng = np.random.default_rng(0)
  lengths = []
  for i in range(200):
    v = synthetic.random_video(rng, f"v{i}")
    assert len(v.scenes) == synthetic.num_cubes(v.seconds)
    assert v.scenes[0].is_title and 1 <= v.scenes[0].end <= 3
    assert [s.start for s in v.scenes[1:]] == v.cuts == [s.end for s in v.scenes[:-1]]
    assert v.scenes[-1].end == v.seconds and all(s.end - s.start >= 1 for s in v.scenes)
    for a, b in zip(v.scenes[1:], v.scenes[2:]):
      assert a.colour != b.colour and a.shape != b.shape
    assert v.caption.count(", then ") == len(v.scenes) - 2
    lengths += [s.end - s.start for s in v.scenes[1:]]
  assert min(lengths) == 2 and max(lengths) >= 10


def test_decoded_frames_change_exactly_at_the_cuts(tmp_path):
  from data_pipeline.video import read_video
  rng = np.random.default_rng(1)
  for i in range(3):
    v = synthetic.random_video(rng, f"v{i}")
    path = str(tmp_path / f"v{i}.mp4")
    synthetic.encode_video(v, path, size=112, fps=4)
    clip = read_video(path, num_frames=16, fps=1.0, image_size=98)
    assert len(clip.frames) == v.seconds
    corner = [float(np.median(f[:6, :6])) for f in clip.frames]   # the background grey of each frame
    for f in range(v.seconds):
      scene = next(s for s in v.scenes if s.start <= f < s.end)
      assert abs(corner[f] - scene.background) <= 3, (i, f, corner, v.cuts)
    # The establishing view: a scene's first frame shows more of its colour than its third.
    for s in v.scenes[1:]:
      if s.end - s.start >= 3:
        first = np.abs(clip.frames[s.start].astype(float) - s.background).sum()
        third = np.abs(clip.frames[s.start + 2].astype(float) - s.background).sum()
        assert first > 2 * third


def test_boundary_and_caption_scores():
  assert boundary_matches([4, 9], [5, 12], tolerance=1) == 1
  assert boundary_matches([4, 9], [5, 12], tolerance=0) == 0
  assert boundary_matches([5, 6], [5], tolerance=1) == 1          # a cut matches one prediction only
  assert uniform_starts(16, 5) == [0, 5, 10] and uniform_starts(12, 5) == [0, 6]
  videos = [{"learned": [0, 3, 9], "uniform": [0, 5, 10], "cuts": [3, 8]}]
  assert scores(videos, "learned", 1)["precision"] == 1.0
  assert scores(videos, "learned", 0)["recall"] == 0.5
  assert scores(videos, "uniform", 1)["matched"] == 0
  caps = caption_scores([{"caption": "red circle, then blue square.", "generated": "red circle, then cyan square."}])
  assert caps["exact_match"] == 0.0 and caps["scene_accuracy"] == 0.5


def test_colab_notebook_is_valid_nbformat_4():
  with open(os.path.join(REPO, "launch", "colab.ipynb")) as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 4
  assert nb["metadata"]["accelerator"] == "TPU"
  ids = set()
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code")
    assert isinstance(cell["source"], list) and all(isinstance(s, str) for s in cell["source"])
    assert isinstance(cell["metadata"], dict) and cell["id"] not in ids
    ids.add(cell["id"])
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None
  sources = "".join("".join(c["source"]) for c in nb["cells"])
  assert "launch.train" in sources and "launch.demo" in sources and "benchmarks/train_step.py" in sources


@pytest.mark.parametrize("script", ["demo.sh", "tpu_vm.sh", "tpu_pod.sh"])
def test_launch_scripts_parse(script):
  subprocess.run(["bash", "-n", os.path.join(REPO, "launch", script)], check=True)


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
  from launch import demo
  assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
  summary = json.load(open(tmp_path / "summary.json"))
  assert [s["stage"] for s in summary["stages"]] == [1, 2, 3]
  assert all(s["final_loss"] is not None and np.isfinite(s["final_loss"]) for s in summary["stages"])
  b = summary["boundaries"]
  for key in ("learned_tol1", "uniform_tol1", "learned_tol0", "uniform_tol0"):
    assert 0.0 <= b[key]["precision"] <= 1.0 and b[key]["true"] > 0
  assert b["learned_tol1"]["predicted"] == b["uniform_tol1"]["predicted"] == b["learned_tol1"]["true"]
  assert summary["answers"]["videos"] + summary["answers"]["failed"] == 8
  assert 0.0 <= summary["answers"]["scene_accuracy"] <= 1.0
  assert len(summary["timelines"]) == 3
  for png in ("boundaries.png", "loss.png", *summary["timelines"]):
    with open(tmp_path / png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Stage 2 started from stage 1's checkpoint, stage 3 from stage 2's.
  configs = [json.load(open(tmp_path / f"stage{s}" / "config.json")) for s in (2, 3)]
  assert configs[0]["train"]["init_from"].endswith("stage1") and configs[1]["train"]["init_from"].endswith("stage2")
