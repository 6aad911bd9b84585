"""Damage detection for checkpoint step directories.

After orbax finalises a step, every process records the size and CRC-32 of its share of the files under
it (every n-th of the sorted list) in `<step>/qv_checksums-<i>-of-<n>.json` (files, not a directory:
orbax takes directories for items), on a background thread, files hashed in parallel (zlib releases the GIL).
Before a restore, `step_problems` re-hashes the files (each process its share) and also checks what
orbax needs but cannot explain when absent or unreadable: the items' `_METADATA`, this process's data-
iterator JSON. CRC-32 finds any flipped byte, truncation or deletion; it is not a defence against a
deliberate forger.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import zlib

CHECKSUM_PREFIX = "qv_checksums-"
ARRAY_ITEMS = ("params", "opt_state", "meta")
_CHUNK = 16 << 20
_PART = re.compile(r"qv_checksums-(\d+)-of-(\d+)\.json")


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
      if not rel.startswith(CHECKSUM_PREFIX):
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


def write_checksums(step_dir: str, share: tuple[int, int] = (0, 1)) -> None:
  """Records the size and CRC-32 of this process's share (`(index, count)`) of the files, atomically."""
  index, count = share
  sums = _hash_all(step_dir, _files(step_dir)[index::count], _threads())
  record = {"version": 1, "algorithm": "crc32",
            "files": {rel: list(v) for rel, v in sums.items() if v is not None}}
  path = os.path.join(step_dir, f"{CHECKSUM_PREFIX}{index}-of-{count}.json")
  with open(path + ".tmp", "w") as f:
    json.dump(record, f)
  os.replace(path + ".tmp", path)


def read_checksums(step_dir: str) -> dict[str, tuple[int, int]] | None:
  """The recorded {file: (size, crc)}; None when the step has none or not all parts (a run stopped while
  hashing); raises ValueError when a part is unreadable."""
  parts = [m for n in (os.listdir(step_dir) if os.path.isdir(step_dir) else []) if (m := _PART.fullmatch(n))]
  names = sorted(m.group(0) for m in parts)
  counts = {int(m.group(2)) for m in parts}
  if not parts or len(counts) != 1 or len(parts) != counts.pop():
    return None
  files = {}
  for n in names:
    try:
      with open(os.path.join(step_dir, n)) as f:
        record = json.load(f)
      files.update({str(k): (int(v[0]), int(v[1])) for k, v in record["files"].items()})
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as e:
      raise ValueError(f"{n} is unreadable ({type(e).__name__})") from None
  return files


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
