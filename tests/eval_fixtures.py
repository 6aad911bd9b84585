"""Tiny benchmark directories in each benchmark's published layout, with generated videos (tests/videos.py)
and known answers. Each writer returns the root folder."""

import json
import os

from videos import frame_pattern, write_garbage, write_video

RATE = 4  # frames per second of the generated videos


def video(path, seconds: int) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if not os.path.exists(path):
    write_video(path, num_frames=seconds * RATE, rate=RATE, width=64, height=48)
  return path


def frame_folder(path, count: int) -> str:
  from PIL import Image
  os.makedirs(path, exist_ok=True)
  for i in range(1, count + 1):
    Image.fromarray(frame_pattern(i, 64, 48)).save(os.path.join(path, f"{i:05d}.jpg"))
  return path


def _json(path, data) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f)


VIDEOMME_ROWS = [
  # question_id, videoID, duration, task_type, question, answer
  ("001-1", "vidA", "short", "Counting Problem", "How many squares are white at the start?", "A"),
  ("001-2", "vidA", "short", "OCR Problems", "What text appears?", "B"),
  ("002-1", "vidB", "medium", "Counting Problem", "How many scene changes are there?", "C"),
  ("003-1", "vidC", "long", "OCR Problems", "Which pattern comes last?", "D"),
  ("004-1", "vidMissing", "long", "Counting Problem", "How many frames?", "A"),
  ("005-1", "vidA", "short", "OCR Problems", "   ", "A"),  # empty question: skipped and counted
]


def write_videomme(root) -> str:
  import pyarrow as pa
  import pyarrow.parquet as pq
  root = os.fspath(root)
  for vid, seconds in (("vidA", 3), ("vidB", 4), ("vidC", 5)):
    video(os.path.join(root, "data", f"{vid}.mp4"), seconds)
  rows = [dict(video_id=qid[:3], duration=dur, domain="Knowledge", sub_category="Humanity",
               url=f"https://www.youtube.com/watch?v={vid}", videoID=vid, question_id=qid, task_type=task,
               question=q, options=[f"{l}. option {l.lower()} of {qid}" for l in "ABCD"], answer=ans)
          for qid, vid, dur, task, q, ans in VIDEOMME_ROWS]
  os.makedirs(os.path.join(root, "videomme"), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, "videomme", "test-00000-of-00001.parquet"))
  return root


def write_mvbench(root) -> str:
  from qv_jax.infer.eval.readers.mvbench import TASKS
  root = os.fspath(root)
  items = {index: [] for index, *_ in TASKS.values()}
  items["action_sequence.json"] = [
    {"video": "seq1.mp4", "question": "What did the person do first?", "candidates": ["sat", "stood", "ran"],
     "answer": "stood", "start": 2.0, "end": 5.0},
    {"video": "seq1.mp4", "question": "What did the person do last?", "candidates": ["sat", "stood"],
     "answer": "sat", "start": 0.5, "end": 7.5}]
  items["action_antonym.json"] = [
    {"video": "ant1.mp4", "question": "What is happening?", "candidates": ["opening", "closing", "none"],
     "answer": "none"}]
  items["episodic_reasoning.json"] = [
    {"video": "clip1", "question": "Why did she leave?", "candidates": ["tired", "late", "bored", "sad"],
     "answer": "late", "start": 1.0, "end": 6.0}]
  items["fine_grained_action.json"] = [
    {"video": "missing.mp4", "question": "Which action?", "candidates": ["x", "y"], "answer": "y"}]
  items["object_shuffle.json"] = [
    {"video": "shuf.mp4", "question": "Where is the ball?", "candidates": ["left", "right"], "answer": "middle"}]
  for index, data in items.items():
    _json(os.path.join(root, "json", index), data)
  video(os.path.join(root, "video", "star", "Charades_v1_480", "seq1.mp4"), 8)
  video(os.path.join(root, "video", "ssv2_video", "ant1.mp4"), 3)
  video(os.path.join(root, "video", "perception", "videos", "shuf.mp4"), 2)
  frame_folder(os.path.join(root, "video", "tvqa", "frames_fps3_hq", "clip1"), 30)
  return root


def write_mlvu(root) -> str:
  """Ten questions; `4_count/1` has no video file, `4_count/2` a corrupt one."""
  from qv_jax.infer.eval.readers.mlvu import TASKS
  root = os.fspath(root)
  for task, stem in TASKS.items():
    data = [{"video": f"{task}_1.mp4", "duration": 3, "question": f"What about {task}?",
             "candidates": ["first", "second", "third", "fourth"], "answer": "second", "question_type": task}]
    if task == "plotQA":
      data.append({"video": f"{task}_2.mp4", "duration": 4, "question": "Who enters?",
                   "candidates": ["a dog", "a cat"], "answer": "a cat", "question_type": task})
    if task == "count":
      data.append({"video": "gone.mp4", "duration": 4, "question": "How many?", "candidates": ["1", "2"],
                   "answer": "2", "question_type": task})
      data.append({"video": "broken.mp4", "duration": 4, "question": "How many cuts?", "candidates": ["1", "2"],
                   "answer": "1", "question_type": task})
    _json(os.path.join(root, "json", f"{stem}.json"), data)
    for sample in data:
      if sample["video"] == "broken.mp4":
        write_garbage(os.path.join(root, "video", stem, sample["video"]))
      elif sample["video"] != "gone.mp4":
        video(os.path.join(root, "video", stem, sample["video"]), sample["duration"])
  return root

