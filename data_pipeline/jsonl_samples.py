"""One jsonl line -> one dataset record (see tfds_builder's docstring for the record's fields); never raises.

Keys read, as the reference's `LazySupervisedDataset` reads them (SPEC §1, §7):

| key                      | meaning |
|--------------------------|---------|
| `video` or `video_id`    | a video path (`video` wins when both are set, as in the reference) |
| `image`                  | one image path or a list of them |
| `start_sec` / `end_sec`  | clip bounds in seconds (our older `start` / `end` are read too; both forms must agree) |
| `conversations`          | `[{"from": "human" / "gpt", "value": ...}, ...]` |
| `id`                     | any JSON scalar, stored as text |
| `data_type`              | only `"conversations"` (the default) is read; `caption` / `interleave` are refused |
| `timestamps`             | a TSV video's frame times (numbers), used only for "frames" records |
| `video_len`, `metadata`, `image_size` | known, not needed |

Other keys are ignored, except on a line without media: a key named like media (video, image, frame, clip, file,
path, ...) or holding a media-looking path (`.mp4`, `.jpg`, ...) makes the line an error ("unknown_media_key"),
never a silent text-only sample. Reasons set here: bad_json, bad_id, bad_clip, unknown_media_key,
unsupported_data_type, the media refusals of `media_files`, bad_tsv (`tsv_frames`), and internal_error (a bug,
logged with its traceback).
"""

import json
import logging
import math
import os
import re
from typing import Iterator

import numpy as np

from data_pipeline.media_files import RECORD_LIMIT_BYTES, MediaReader, MediaRefused, escape
from data_pipeline.tsv_frames import TsvStores

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 * 2**20
KNOWN_KEYS = frozenset({"id", "conversations", "video", "video_id", "image", "start", "end", "start_sec", "end_sec",
                        "data_type", "timestamps", "video_len", "metadata", "image_size"})
_MEDIA_KEY = re.compile(r"vid|image|img|frame|clip|media|audio|movie|photo|picture|file|path|url|tsv", re.I)
_MEDIA_EXT = re.compile(r"\.(mp4|m4v|mkv|webm|avi|mov|flv|wmv|mpe?g|ts|3gp|gif|jpe?g|png|bmp|webp|tiff?|heic)$",
                        re.I)


class _Bad(Exception):
  def __init__(self, reason: str, detail: str):
    self.reason, self.detail = reason, detail
    super().__init__(detail)


def empty_record(origin: str, error: str, detail: str, sample_id: str = "", modality: str = "text") -> dict:
  return dict(id=sample_id, origin=origin, modality=modality, media=np.zeros((0,), np.object_),
              media_path=np.zeros((0,), np.object_), conversations="[]", start=math.nan, end=math.nan,
              timestamps=np.zeros((0,), np.float32), error=error, error_detail=detail)


def _seconds(sample: dict, key: str, old_key: str) -> float:
  values = {k: sample[k] for k in (key, old_key) if sample.get(k) is not None}
  for k, v in values.items():
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
      raise _Bad("bad_clip", f"{k!r} is {escape(repr(v))[:60]}; expected a finite number of seconds >= 0")
  if len(set(float(v) for v in values.values())) > 1:
    raise _Bad("bad_clip", f"{key!r} ({values[key]}) and {old_key!r} ({values[old_key]}) disagree")
  return float(next(iter(values.values()))) if values else math.nan


def _looks_like_media(value) -> bool:
  items = value if isinstance(value, list) else [value]
  return any(isinstance(v, str) and _MEDIA_EXT.search(v.strip()) for v in items)


def _media(sample: dict) -> tuple[str, list]:
  video = sample.get("video") if sample.get("video") is not None else sample.get("video_id")
  image = sample.get("image")
  if video is not None and image is not None:
    raise _Bad("bad_json", "both a video and an image key are set; expected one")
  if video is not None:
    return "video", [video]
  if image is not None:
    return "image", image if isinstance(image, list) else [image]
  unknown = [k for k, v in sample.items()
             if k not in KNOWN_KEYS and v is not None and (_MEDIA_KEY.search(k) or _looks_like_media(v))]
  if unknown:
    raise _Bad("unknown_media_key", f"no 'video' / 'video_id' / 'image' key, but media-like key(s) "
               f"{[escape(k) for k in unknown]}; rename to one the builder reads")
  return "text", []


def _timestamps(sample: dict) -> np.ndarray:
  value = sample.get("timestamps")
  if value is None:
    return np.zeros((0,), np.float32)
  if not isinstance(value, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in value):
    raise _Bad("bad_json", f"'timestamps' must be a list of numbers, got {escape(repr(value))[:80]}")
  return np.asarray(value, np.float32)


def _parse(text: str, origin: str, reader: MediaReader, tsv: TsvStores | None) -> dict:
  try:
    sample = json.loads(text)
  except json.JSONDecodeError as e:
    raise _Bad("bad_json", f"not valid JSON ({e.msg} at column {e.colno})") from None
  except (ValueError, RecursionError) as e:  # e.g. a 5000-digit integer, nesting too deep
    raise _Bad("bad_json", f"not usable JSON ({escape(str(e))[:120]})") from None
  if not isinstance(sample, dict):
    raise _Bad("bad_json", f"expected a JSON object, got a {type(sample).__name__}")
  raw_id = sample.get("id", "")
  sample_id = raw_id if isinstance(raw_id, str) else json.dumps(raw_id, ensure_ascii=False)
  record = empty_record(origin, "", "", escape(sample_id))
  try:
    if escape(sample_id) != sample_id:
      raise _Bad("bad_id", f"id {escape(sample_id)!r} is not valid UTF-8")
    data_type = sample.get("data_type", "conversations")
    if data_type != "conversations":
      raise _Bad("unsupported_data_type", f"data_type {escape(repr(data_type))[:60]}: only 'conversations' "
                 "samples are read (caption / interleave need the reference's random prompts)")
    if not isinstance(sample.get("conversations"), list):
      raise _Bad("bad_json", "expected a 'conversations' list")
    modality, paths = _media(sample)
    record["modality"] = modality
    if modality == "image" and not paths:
      raise _Bad("bad_json", "'image' is an empty list")
    if not all(isinstance(p, str) and p for p in paths):
      raise _Bad("bad_json", f"media paths must be non-empty strings, got {escape(repr(paths))[:120]}")
    record.update(start=_seconds(sample, "start_sec", "start"), end=_seconds(sample, "end_sec", "end"),
                  conversations=json.dumps(sample["conversations"], ensure_ascii=True),
                  media_path=np.array([escape(p).encode() for p in paths] or [], np.object_))
    if record["end"] < record["start"]:
      raise _Bad("bad_clip", f"the clip ends ({record['end']} s) before it starts ({record['start']} s)")
    frames = tsv.frames(paths[0], reader.max_bytes) if tsv is not None and modality == "video" else None
    if frames is not None:
      record.update(modality="frames", timestamps=_timestamps(sample))
    blobs = frames if frames is not None else [reader.read(p) for p in paths]
    if sum(len(b) for b in blobs) > RECORD_LIMIT_BYTES:
      raise _Bad("file_too_large", f"{len(blobs)} images hold {sum(len(b) for b in blobs)} bytes, more than one "
                 f"record can ({RECORD_LIMIT_BYTES})")
  except _Bad as e:
    record.update(error=e.reason, error_detail=e.detail)
    return record
  except MediaRefused as e:
    record.update(error=e.reason, error_detail=str(e))
    return record
  record["media"] = np.array(blobs, np.object_) if blobs else np.zeros((0,), np.object_)
  return record


def parse_line(raw: bytes, origin: str, reader: MediaReader | str | os.PathLike, tsv: TsvStores | None = None) -> dict:
  """One jsonl line (bytes, no newline) -> one record. `reader`: a MediaReader, or a media root (default rules);
  `tsv`: the reference's TSV frame stores, looked up first for videos (a "frames" record when found)."""
  if not isinstance(reader, MediaReader):
    reader = MediaReader(reader)
  origin = escape(origin)
  try:
    return _parse(raw.decode("utf-8", errors="surrogateescape"), origin, reader, tsv)
  except _Bad as e:
    return empty_record(origin, e.reason, e.detail)
  except Exception as e:  # a bug here must not cost the build its good samples
    log.exception("build: %s: unexpected error", origin)
    return empty_record(origin, "internal_error", f"{type(e).__name__}: {escape(str(e))[:200]}")


def _lines(f) -> Iterator[tuple[int, bytes | None]]:
  """(line number, bytes without the newline or a leading UTF-8 BOM) per line; None for a line longer than
  MAX_LINE_BYTES."""
  line_no = 0
  while raw := f.readline(MAX_LINE_BYTES + 1):
    line_no += 1
    if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
      while (rest := f.readline(2**20)) and not rest.endswith(b"\n"):
        pass
      yield line_no, None
    else:
      yield line_no, raw.rstrip(b"\r\n").removeprefix(b"\xef\xbb\xbf" if line_no == 1 else b"")


def open_jsonl(path: str | os.PathLike):
  """`path` opened for reading; ValueError for anything but a regular file (a FIFO would block)."""
  path = os.fspath(path)
  if "://" not in path:
    if not os.path.exists(path):
      raise FileNotFoundError(f"jsonl {escape(path)} does not exist")
    if not os.path.isfile(path):
      raise ValueError(f"jsonl {escape(path)} is not a regular file")
  from etils import epath
  return epath.Path(path).open("rb")


def read_jsonl(path: str | os.PathLike, reader: MediaReader, tsv: TsvStores | None = None
               ) -> Iterator[tuple[int, dict]]:
  """(line number, record) for every non-blank line of `path`."""
  name = os.path.basename(os.fspath(path))
  with open_jsonl(path) as f:
    for line_no, raw in _lines(f):
      origin = escape(f"{name}:{line_no}")
      if raw is None:
        yield line_no, empty_record(origin, "bad_json", f"line longer than {MAX_LINE_BYTES} bytes")
      elif raw.strip():
        yield line_no, parse_line(raw, origin, reader, tsv)


def count_lines(path: str | os.PathLike) -> int:
  with open_jsonl(path) as f:
    return sum(1 for _, raw in _lines(f) if raw is None or raw.strip())
