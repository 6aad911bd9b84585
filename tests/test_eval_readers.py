"""Benchmark readers on fixtures in each benchmark's published layout; one-line errors for broken ones."""

import json
import os

import numpy as np
import pytest

from eval_fixtures import write_mlvu, write_mvbench, write_videomme
from qv_jax.infer.eval.frames import MissingVideo, folder_frames, reference_folder_indices
from qv_jax.infer.eval.items import BenchmarkError, FrameFolder, VideoFile
from qv_jax.infer.eval.readers import mlvu, mvbench, videomme
from videos import frame_index_of


def test_videomme_reader(tmp_path):
  root = write_videomme(tmp_path)
  read = videomme.read(root)
  assert [it.key for it in read.items] == ["001-1", "001-2", "002-1", "003-1", "004-1"]
  assert list(read.skipped) == ["005-1"] and "empty question" in read.skipped["005-1"]
  first = read.items[0]
  assert first.question == (
    "Carefully read the following question and select the letter corresponding to the correct answer."
    "Highlight the applicable choices without giving explanations.\nHow many squares are white at the start?"
    "\nOptions:\nA. option a of 001-1\nB. option b of 001-1\nC. option c of 001-1\nD. option d of 001-1")
  assert first.options == ("option a of 001-1", "option b of 001-1", "option c of 001-1", "option d of 001-1")
  assert first.answer == "A" and first.meta["duration"] == "short" and first.task == "Counting Problem"
  assert first.video == VideoFile(os.path.join(root, "data", "vidA.mp4"))
  assert not os.path.exists(read.items[4].video.path)


def test_mvbench_reader_bounds_variants_and_frame_folders(tmp_path):
  root = write_mvbench(tmp_path)
  read = mvbench.read(root, fps=1.0)
  keys = [it.key for it in read.items]
  assert keys == ["action_sequence/0", "action_sequence/0#reference", "action_sequence/1",
                  "action_sequence/1#reference", "action_antonym/0", "fine_grained_action/0",
                  "episodic_reasoning/0", "episodic_reasoning/0#reference"]
  assert list(read.skipped) == ["object_shuffle/0"] and "not one of the candidates" in read.skipped["object_shuffle/0"]
  seq, seq_ref = read.items[0], read.items[1]
  assert seq.question == "Question: What did the person do first?\nOptions:\n(A) sat\n(B) stood\n(C) ran"
  assert seq.answer == "B" and seq.task == "Action Sequence"
  assert (seq.video.start_sec, seq.video.end_sec) == (2.0, 5.0)
  assert seq_ref.variant == "reference" and seq_ref.video == VideoFile(seq.video.path)
  ep, ep_ref = read.items[6], read.items[7]
  assert ep.video == FrameFolder(os.path.join(root, "video", "tvqa", "frames_fps3_hq", "clip1"), 3.0, 1.0, 6.0)
  assert ep_ref.video.reference and ep_ref.video.ref_fps == 1.0 and ep.answer == "B"
  assert [it.key for it in mvbench.read(root, reference_inputs=False).items] == [
    "action_sequence/0", "action_sequence/1", "action_antonym/0", "fine_grained_action/0", "episodic_reasoning/0"]


def test_mvbench_frame_folder_standard_and_reference_reading(tmp_path):
  root = write_mvbench(tmp_path)
  folder = os.path.join(root, "video", "tvqa", "frames_fps3_hq", "clip1")
  frames, stamps = folder_frames(FrameFolder(folder, 3.0, 1.0, 6.0), num_frames=420, fps=1.0)
  # one frame per second between 1 s and 6 s at 3 fps: 0-based 3+1, 6+1, ... (the middle of each second)
  assert [frame_index_of(f) for f in frames] == [5, 8, 11, 14, 17, 20]
  assert stamps == [1.3, 2.3, 3.3, 4.3, 5.3, 6.3]
  ref = reference_folder_indices(30, 8, 1.0, 1.0, 6.0)
  assert ref == [1, 2, 2, 3, 3, 4, 5, 5]   # seg 5/8, np.round(2.5) = 2; duplicates kept as read_frame keeps them
  frames, stamps = folder_frames(FrameFolder(folder, 3.0, 1.0, 6.0, reference=True, ref_fps=1.0), 8, 1.0)
  assert [frame_index_of(f) for f in frames] == ref and stamps == [float(i) for i in ref]
  assert frames.dtype == np.uint8 and frames.shape == (8, 48, 64, 3)
  with pytest.raises(MissingVideo, match="clip9: frame folder not found"):
    folder_frames(FrameFolder(folder.replace("clip1", "clip9")), 8, 1.0)


def test_mlvu_reader(tmp_path):
  root = write_mlvu(tmp_path)
  read = mlvu.read(root)
  assert len(read.items) == 10 and not read.skipped
  plot = read.items[0]
  assert plot.key == "1_plotQA/0" and plot.task == "plotQA" and plot.answer == "B"
  assert plot.question == ("Question: What about plotQA?\nOptions:\n(A) first\n(B) second\n(C) third\n(D) fourth\n"
                           "Respond with only the letter (A, B, C or D) of the correct option.")
  assert plot.video.path == os.path.join(root, "video", "1_plotQA", "plotQA_1.mp4")
  assert read.items[1].answer == "B" and read.items[1].options == ("a dog", "a cat")


@pytest.mark.parametrize("bench,remove,message", [
  ("videomme", "videomme/test-00000-of-00001.parquet", "no Video-MME index"),
  ("mvbench", "json/episodic_reasoning.json", "missing MVBench index file(s) episodic_reasoning.json"),
  ("mvbench", "json", "no MVBench index folder json/"),
  ("mlvu", "json/3_ego.json", "missing MLVU index file(s) 3_ego.json"),
])
def test_missing_index_files_one_line(tmp_path, bench, remove, message):
  writer = {"videomme": write_videomme, "mvbench": write_mvbench, "mlvu": write_mlvu}[bench]
  reader = {"videomme": videomme.read, "mvbench": mvbench.read, "mlvu": mlvu.read}[bench]
  root = writer(tmp_path)
  target = os.path.join(root, remove)
  if os.path.isdir(target):
    import shutil
    shutil.rmtree(target)
  else:
    os.remove(target)
  with pytest.raises(BenchmarkError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
    reader(root)
  assert "\n" not in str(e.value)


def test_malformed_samples_are_skipped_and_named(tmp_path):
  root = write_mlvu(tmp_path)
  path = os.path.join(root, "json", "3_ego.json")
  with open(path, "w") as f:
    json.dump([{"video": "x.mp4", "question": "", "candidates": ["a"], "answer": "a"},
               {"video": "x.mp4", "question": "q", "candidates": "ab", "answer": "a"}, 7], f)
  read = mlvu.read(root)
  assert read.skipped == {
    "3_ego/0": f"{path} item 0: empty question",
    "3_ego/1": f"{path} item 1: 'candidates' must be a list of 1 to 10 options",
    "3_ego/2": f"{path} item 2: expected an object, got int"}
  with open(path, "w") as f:
    f.write("{not json")
  with pytest.raises(BenchmarkError, match="3_ego.json: not a readable JSON file"):
    mlvu.read(root)
