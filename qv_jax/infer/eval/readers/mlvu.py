"""MLVU (dev set, the layout the reference reads): `json/{1_plotQA,2_needle,3_ego,4_count,5_order,
6_anomaly_reco,7_topic_reasoning}.json` (video, question, candidates, answer text) and `video/<index stem>/`.
The two open-ended tasks (sub_scene, summary) are not multiple choice and are not read, as in the reference."""

import os

from qv_jax.infer.eval.items import BenchmarkError, Item, ReadResult, VideoFile
from qv_jax.infer.eval.readers.common import check_choice, lettered_options, load_json_list, missing_files

TASKS = {
  "plotQA": "1_plotQA", "needle": "2_needle", "ego": "3_ego", "count": "4_count", "order": "5_order",
  "anomaly_reco": "6_anomaly_reco", "topic_reasoning": "7_topic_reasoning",
}
INSTRUCTION = "Respond with only the letter (A, B, C or D) of the correct option."


def prompt(question: str, candidates) -> str:
  return f"Question: {question}\nOptions:\n{lettered_options(candidates)}{INSTRUCTION}\n".rstrip()


def read(data_dir: str) -> ReadResult:
  json_dir = os.path.join(data_dir, "json")
  if not os.path.isdir(json_dir):
    raise BenchmarkError(f"{data_dir}: no MLVU index folder json/ (expected json/1_plotQA.json ... 7_topic_reasoning.json)")
  missing = missing_files(json_dir, [f"{s}.json" for s in TASKS.values()])
  if missing:
    raise BenchmarkError(f"{json_dir}: missing MLVU index file(s) {', '.join(missing)}")
  result = ReadResult(items=[])
  for task, stem in TASKS.items():
    path = os.path.join(json_dir, f"{stem}.json")
    for n, sample in enumerate(load_json_list(path)):
      key = f"{stem}/{n}"
      try:
        question, candidates, answer = check_choice(sample, f"{path} item {n}")
      except ValueError as e:
        result.skipped[key] = str(e)
        continue
      result.items.append(Item(
        key=key, task=task, video=VideoFile(os.path.join(data_dir, "video", stem, sample["video"])),
        question=prompt(question, candidates), options=tuple(candidates), answer=chr(ord("A") + answer),
        meta={"index": n, "question_type": str(sample.get("question_type", ""))}))
  return result
