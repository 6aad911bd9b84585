"""Damage detection for checkpoint step directories.

After orbax finalises a step, process 0 records the size and CRC-32 of every file under it in
`<step>/qv_checksums.json` (on a background thread, files hashed in parallel: zlib releases the GIL).
Before a restore, `step_problems` re-hashes the files (each process its share) and also checks what
orbax needs but cannot explain when absent or unreadable: the items' `_METADATA`, this process's data-
iterator JSON. CRC-32 finds any flipped byte, truncation or deletion; it is not a defence against a
deliberate forger.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import zlib

CHECKSUM_FILE = "qv_checksums.json"
ARRAY_ITEMS = ("params", "opt_state", "meta")
_CHUNK = 16 << 20


def file_crc32(path: str) -> tuple[int, int]:
  """(size in bytes, CRC-32) of a file, read in 16 MiB chunks."""
  crc, size = 0, 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
      size += len(chunk)
  return size, crc


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for n in names:
      rel = os.path.relpath(os.path.join(root, n), step_dir)
      if rel != CHECKSUM_FILE:
        out.append(rel)
  return sorted(out)


def _hash_all(step_dir: str, rels: list[str], threads: int) -> dict[str, tuple[int, int] | None]:
  def one(rel):
    try:
      return rel, file_crc32(os.path.join(step_dir, rel))
    except FileNotFoundError:
      return rel, None
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    return dict(pool.map(one, rels))


def _threads() -> int:
  return min(8, os.cpu_count() or 1)


def write_checksums(step_dir: str) -> None:
  """Records every file's size and CRC-32 (atomically: a temporary file renamed into place)."""
  sums = _hash_all(step_dir, _files(step_dir), _threads())
  record = {"version": 1, "algorithm": "crc32",
            "files": {rel: list(v) for rel, v in sums.items() if v is not None}}
  tmp = os.path.join(step_dir, CHECKSUM_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(record, f)
  os.replace(tmp, os.path.join(step_dir, CHECKSUM_FILE))


def read_checksums(step_dir: str) -> dict[str, tuple[int, int]] | None:
  """The recorded {file: (size, crc)}, None when the step has none; raises ValueError when unreadable."""
  path = os.path.join(step_dir, CHECKSUM_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    return {str(k): (int(v[0]), int(v[1])) for k, v in record["files"].items()}
  except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
    raise ValueError(f"{CHECKSUM_FILE} is unreadable ({type(e).__name__})") from None


def content_problems(step_dir: str, recorded: dict[str, tuple[int, int]], share: tuple[int, int] = (0, 1)
                     ) -> list[str]:
  """Files of this process's share (`(index, count)`: every count-th file) that are missing, truncated,
  grown or changed against the recorded checksums."""
  index, count = share
  rels = sorted(recorded)[index::count]
  now = _hash_all(step_dir, rels, _threads())
  problems = []
  for rel in rels:
    size, crc = recorded[rel]
    got = now[rel]
    if got is None:
      problems.append(f"{rel} is missing")
    elif got[0] != size:
      problems.append(f"{rel} has {got[0]} bytes, {size} were written" +
                      (" (truncated)" if got[0] < size else ""))
    elif got[1] != crc:
      problems.append(f"{rel} has changed since it was written (checksum mismatch)")
  return problems


def structure_problems(step_dir: str, data_file: str) -> tuple[list[str], str | None]:
  """Checks what every restore reads first. Returns (damage, incompatibility): damage falls back to an
  older checkpoint; an incompatibility (written by another number of processes) does not."""
  if not os.path.isdir(step_dir) or not os.listdir(step_dir):
    return ["the step directory is empty"], None
  problems = []
  for item in ARRAY_ITEMS:
    item_dir = os.path.join(step_dir, item)
    if not os.path.isdir(item_dir):
      problems.append(f"{item}/ is missing")
      continue
    meta = os.path.join(item_dir, "_METADATA")
    if not os.path.exists(meta):
      problems.append(f"{item}/_METADATA (the array names, shapes and dtypes) is missing")
      continue
    try:
      with open(meta, "rb") as f:
        json.loads(f.read().decode())
    except (ValueError, UnicodeDecodeError):
      problems.append(f"{item}/_METADATA is not valid JSON")
  data_dir = os.path.join(step_dir, "data")
  path = os.path.join(data_dir, data_file)
  if not os.path.isdir(data_dir):
    problems.append("data/ (the data-iterator state) is missing")
  elif not os.path.exists(path):
    others = sorted(n for n in os.listdir(data_dir) if n.startswith("process_") and n.endswith(".json"))
    if others:
      return problems, (f"data/{data_file} does not exist but {others} do: the checkpoint was written by a "
                        f"different number of processes than run now")
    problems.append(f"data/{data_file} (this process's data-iterator state) is missing")
  else:
    try:
      with open(path, "rb") as f:
        obj = json.loads(f.read().decode())
      if not isinstance(obj, dict) or not ({"bytes", "json"} & set(obj)):
        raise ValueError
    except (ValueError, UnicodeDecodeError):
      problems.append(f"data/{data_file} (the data-iterator state) is not the JSON this trainer writes")
  return problems, None
