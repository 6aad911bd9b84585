"""Helpers shared by the benchmark readers: JSON index files and the (A) ... option prompts."""

import json
import os

from qv_jax.infer.eval.items import BenchmarkError


def require_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise BenchmarkError(f"{path}: {what} directory not found")
  return path


def load_json_list(path: str) -> list:
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise BenchmarkError(f"{path}: index file not found") from None
  except (OSError, ValueError) as e:
    raise BenchmarkError(f"{path}: not a readable JSON file ({e})") from None
  if not isinstance(data, list):
    raise BenchmarkError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
  return data


def missing_files(root: str, names) -> list[str]:
  return [n for n in names if not os.path.isfile(os.path.join(root, n))]


def lettered_options(candidates) -> str:
  """"(A) c1\\n(B) c2..." as MVBench and MLVU prompts list them."""
  return "".join(f"({chr(ord('A') + i)}) {c}\n" for i, c in enumerate(candidates))


def check_choice(sample, where: str) -> tuple[str, list[str], int]:
  """(question, candidates, index of the answer: the last equal candidate, as the reference's loop leaves it) of an MVBench / MLVU sample; ValueError naming
  the field when one is missing or the answer is not a candidate (the reference would score it as '@')."""
  if not isinstance(sample, dict):
    raise ValueError(f"{where}: expected an object, got {type(sample).__name__}")
  question = sample.get("question")
  if not isinstance(question, str) or not question.strip():
    raise ValueError(f"{where}: empty question")
  candidates = sample.get("candidates")
  if not isinstance(candidates, list) or not candidates or len(candidates) > 10:
    raise ValueError(f"{where}: 'candidates' must be a list of 1 to 10 options")
  candidates = [str(c) for c in candidates]
  if not isinstance(sample.get("video"), str) or not sample["video"]:
    raise ValueError(f"{where}: missing 'video'")
  answer = sample.get("answer")
  if str(answer) not in candidates:
    raise ValueError(f"{where}: answer {answer!r} is not one of the candidates")
  return question, candidates, len(candidates) - 1 - candidates[::-1].index(str(answer))
