"""Video-MME (lmms-lab/Video-MME): `videomme/test-00000-of-00001.parquet` (videoID, question, options
["A. ...", ...], answer letter, duration short|medium|long, task_type, question_id) and `{videoID}.mp4` under
`data/` (the unzipped release) or `video_mme_video/` (the reference's name). No subtitles, as the reference."""

import glob
import os
import re

from qv_jax.infer.eval.items import BenchmarkError, Item, ReadResult, VideoFile

PROMPT = ("Carefully read the following question and select the letter corresponding to the correct answer."
          "Highlight the applicable choices without giving explanations.\n{question}\nOptions:")
REQUIRED = ("videoID", "question", "options", "answer", "duration", "question_id")
VIDEO_DIRS = ("data", "video_mme_video", "videos", "video")


def find_parquet(data_dir: str) -> str:
  for pattern in ("videomme/*.parquet", "*.parquet"):
    found = sorted(glob.glob(os.path.join(data_dir, pattern)))
    if found:
      return found[0]
  raise BenchmarkError(f"{data_dir}: no Video-MME index (expected videomme/test-00000-of-00001.parquet)")


def find_video_dir(data_dir: str) -> str:
  for name in VIDEO_DIRS:
    if os.path.isdir(os.path.join(data_dir, name)):
      return os.path.join(data_dir, name)
  return data_dir


def prompt(question: str, options) -> str:
  """The reference's prompt: note the missing space after "answer."; options as given ("A. ...")."""
  return PROMPT.format(question=question) + "".join(f"\n{o}" for o in options)


def _bare(option: str) -> str:
  return re.sub(r"^\s*\(?[A-J]\s*[.):]\s*", "", option)


def read(data_dir: str, video_dir: str | None = None) -> ReadResult:
  import pyarrow.parquet as pq
  path = find_parquet(data_dir)
  try:
    rows = pq.read_table(path).to_pylist()
  except Exception as e:  # pyarrow raises several types for damaged files
    raise BenchmarkError(f"{path}: not a readable parquet file ({e})") from None
  if rows:
    missing = [c for c in REQUIRED if c not in rows[0]]
    if missing:
      raise BenchmarkError(f"{path}: missing column(s) {', '.join(missing)}")
  video_dir = video_dir or find_video_dir(data_dir)
  result = ReadResult(items=[])
  seen = set()
  for n, row in enumerate(rows):
    key = str(row["question_id"])
    where = f"{path} row {n} (question_id {key})"
    question, options, answer = row["question"], row["options"], str(row["answer"] or "").strip()
    if key in seen:
      result.skipped[f"row{n}"] = f"{where}: duplicate question_id"
      continue
    if not isinstance(question, str) or not question.strip():
      result.skipped[key] = f"{where}: empty question"
      continue
    if not options or not all(isinstance(o, str) for o in options) or len(options) > 10:
      result.skipped[key] = f"{where}: 'options' must be a list of 1 to 10 strings"
      continue
    if len(answer) != 1 or not "A" <= answer < chr(ord("A") + len(options)):
      result.skipped[key] = f"{where}: answer {answer!r} is not an option letter"
      continue
    seen.add(key)
    result.items.append(Item(
      key=key, task=str(row.get("task_type") or "unknown"),
      video=VideoFile(os.path.join(video_dir, f"{row['videoID']}.mp4")),
      question=prompt(question, options), options=tuple(_bare(o) for o in options), answer=answer,
      meta={"duration": str(row["duration"]), "task_type": str(row.get("task_type") or "unknown"),
            "domain": str(row.get("domain") or ""), "video_id": str(row["videoID"])}))
  return result
