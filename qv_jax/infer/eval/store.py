"""predictions*.jsonl on disk: append with fsync as answers come, read back tolerating a torn last line."""

import glob
import json
import os

MERGED = "predictions.jsonl"
SETTINGS = "run.json"


def part_name(process_index: int, process_count: int) -> str:
  return MERGED if process_count == 1 else f"predictions.part{process_index}of{process_count}.jsonl"


def _valid_lines(path: str) -> tuple[list[dict], int]:
  """Records of complete, parseable lines, and the byte length of the good prefix."""
  records, good = [], 0
  with open(path, "rb") as f:
    data = f.read()
  for line in data.splitlines(keepends=True):
    if not line.endswith(b"\n"):
      break
    try:
      record = json.loads(line)
    except ValueError:
      break
    if not isinstance(record, dict) or "key" not in record:
      break
    records.append(record)
    good += len(line)
  return records, good


def read_all(out_dir: str) -> dict[str, dict]:
  """key -> record over predictions.jsonl, then every part file; a later line for a key (a retry) wins."""
  done = {}
  paths = [os.path.join(out_dir, MERGED)] + sorted(glob.glob(os.path.join(out_dir, "predictions.part*.jsonl")))
  for path in paths:
    if os.path.isfile(path):
      for record in _valid_lines(path)[0]:
        done[record["key"]] = record
  return done


class Appender:
  """Appends records to one file; a torn tail from a killed run is cut off first."""

  def __init__(self, path: str):
    self.path = path
    if os.path.isfile(path):
      _, good = _valid_lines(path)
      if good != os.path.getsize(path):
        with open(path, "r+b") as f:
          f.truncate(good)
    self._f = open(path, "a")

  def write(self, records) -> None:
    for r in records:
      self._f.write(json.dumps(r, ensure_ascii=False) + "\n")
    self._f.flush()
    os.fsync(self._f.fileno())

  def close(self) -> None:
    self._f.close()


def write_merged(out_dir: str, records) -> str:
  """Atomically replace predictions.jsonl with `records` and remove the part files they include."""
  path = os.path.join(out_dir, MERGED)
  with open(path + ".tmp", "w") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)
  for part in glob.glob(os.path.join(out_dir, "predictions.part*.jsonl")):
    os.remove(part)
  return path


def check_settings(out_dir: str, settings: dict) -> None:
  """Writes out_dir/run.json on the first run; a later run (a resume) must have the same settings, or its
  answers would silently mix with answers to other inputs. ValueError naming the differing fields."""
  path = os.path.join(out_dir, SETTINGS)
  if os.path.isfile(path):
    with open(path) as f:
      stored = json.load(f)
    differ = [f"{k}={stored.get(k)!r} there, {settings.get(k)!r} now" for k in sorted(set(stored) | set(settings))
              if stored.get(k) != settings.get(k)]
    if differ:
      raise ValueError(f"{path}: this folder holds a run with other settings ({'; '.join(differ)}); "
                       "use another --out or the same settings")
    return
  with open(f"{path}.tmp{os.getpid()}", "w") as f:
    json.dump(settings, f, indent=2, sort_keys=True)
  os.replace(f"{path}.tmp{os.getpid()}", path)
