"""MVBench (OpenGVLab/MVBench): `json/<task>.json` for the 20 tasks (video, question, candidates, answer, and
start/end in seconds for the bounded tasks) and the source folders under `video/`. Episodic Reasoning is a
folder of 3-fps TVQA frames per question (`video/tvqa/frames_fps3_hq/<name>/00001.jpg ...`).

Standard items honour start/end. When `reference_inputs` is set, every bounded question also gets a
"reference" variant with the reference's inputs (SPEC §10): whole video for files, `read_frame` at the run's
fps for frame folders; only the reference metrics read those."""

import os

from qv_jax.infer.eval.items import BenchmarkError, FrameFolder, Item, ReadResult, VideoFile
from qv_jax.infer.eval.readers.common import check_choice, lettered_options, load_json_list, missing_files

# task -> (index file under json/, folder under video/, "video" | "frame", bounded in the reference)
TASKS = {
  "Action Sequence": ("action_sequence.json", "star/Charades_v1_480", "video", True),
  "Action Prediction": ("action_prediction.json", "star/Charades_v1_480", "video", True),
  "Action Antonym": ("action_antonym.json", "ssv2_video", "video", False),
  "Fine-grained Action": ("fine_grained_action.json", "Moments_in_Time_Raw/videos", "video", False),
  "Unexpected Action": ("unexpected_action.json", "FunQA_test/test", "video", False),
  "Object Existence": ("object_existence.json", "clevrer/video_validation", "video", False),
  "Object Interaction": ("object_interaction.json", "star/Charades_v1_480", "video", True),
  "Object Shuffle": ("object_shuffle.json", "perception/videos", "video", False),
  "Moving Direction": ("moving_direction.json", "clevrer/video_validation", "video", False),
  "Action Localization": ("action_localization.json", "sta/sta_video", "video", True),
  "Scene Transition": ("scene_transition.json", "scene_qa/video", "video", False),
  "Action Count": ("action_count.json", "perception/videos", "video", False),
  "Moving Count": ("moving_count.json", "clevrer/video_validation", "video", False),
  "Moving Attribute": ("moving_attribute.json", "clevrer/video_validation", "video", False),
  "State Change": ("state_change.json", "perception/videos", "video", False),
  "Fine-grained Pose": ("fine_grained_pose.json", "nturgbd", "video", False),
  "Character Order": ("character_order.json", "perception/videos", "video", False),
  "Egocentric Navigation": ("egocentric_navigation.json", "vlnqa", "video", False),
  "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq", "frame", True),
  "Counterfactual Inference": ("counterfactual_inference.json", "clevrer/video_validation", "video", False),
}
FRAME_FOLDER_FPS = 3.0


def prompt(question: str, candidates) -> str:
  return f"Question: {question}\nOptions:\n{lettered_options(candidates)}".rstrip()


def _bounds(sample, where: str) -> tuple[float | None, float | None]:
  if "start" not in sample and "end" not in sample:
    return None, None
  try:
    start, end = float(sample["start"]), float(sample["end"])
  except (KeyError, TypeError, ValueError):
    raise ValueError(f"{where}: 'start' and 'end' must both be numbers (seconds)") from None
  if not 0 <= start < end:
    raise ValueError(f"{where}: needs 0 <= start < end, got start={start}, end={end}")
  return start, end


def read(data_dir: str, reference_inputs: bool = True, fps: float = 1.0) -> ReadResult:
  json_dir, video_dir = os.path.join(data_dir, "json"), os.path.join(data_dir, "video")
  if not os.path.isdir(json_dir):
    raise BenchmarkError(f"{data_dir}: no MVBench index folder json/ (expected json/<task>.json for the 20 tasks)")
  missing = missing_files(json_dir, [t[0] for t in TASKS.values()])
  if missing:
    raise BenchmarkError(f"{json_dir}: missing MVBench index file(s) {', '.join(missing)}")
  result = ReadResult(items=[])
  for task, (index, folder, kind, bounded) in TASKS.items():
    path = os.path.join(json_dir, index)
    stem = index[:-len(".json")]
    for n, sample in enumerate(load_json_list(path)):
      key, where = f"{stem}/{n}", f"{path} item {n}"
      try:
        question, candidates, answer = check_choice(sample, where)
        start, end = _bounds(sample, where)
      except ValueError as e:
        result.skipped[key] = str(e)
        continue
      source = os.path.join(video_dir, folder, sample["video"])
      standard = (FrameFolder(source, FRAME_FOLDER_FPS, start, end) if kind == "frame"
                  else VideoFile(source, start, end))
      if kind == "frame":
        reference = FrameFolder(source, FRAME_FOLDER_FPS, *((start, end) if bounded else (None, None)),
                                reference=True, ref_fps=fps)
      else:
        reference = VideoFile(source)
      common = dict(task=task, question=prompt(question, candidates), options=tuple(candidates),
                    answer=chr(ord("A") + answer), meta={"index": n})
      result.items.append(Item(key=key, video=standard, **common))
      if reference_inputs and reference != standard:
        result.items.append(Item(key=f"{key}#reference", video=reference, variant="reference", **common))
  return result
