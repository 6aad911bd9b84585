"""The reference's TSV frame stores (SPEC §1.1, §11.9): pre-extracted 1-fps JPEG lists instead of video files.

A store is a directory with `imgs.tsv` (one row per video: `fname<TAB>["<base64 JPEG>", ...]`), `fname2idx.json`
({fname: row}) and `imgs.lineidx` (the byte offset of each row; rebuilt by a scan when absent). The reference's
`video_folder` holds several (ShareGPT4Video/, VideoChat2IT/YouCook2/, ANetCaptions/); a sample's `video` /
`video_id` is looked up by its exact name. Building: `TsvStores.frames(name)` -> the JPEG bytes, stored as a
"frames" record. Loading: `read_frame_list` samples them as the reference's `conversations` path does.
"""

import base64
import binascii
import dataclasses
import json
import os

import numpy as np

from data_pipeline.errors import BadSampleError
from data_pipeline.image import decode_image
from data_pipeline.media_files import MediaRefused, escape
from data_pipeline.preprocess import resize_image

TSV_NAME, INDEX_NAME, LINEIDX_NAME = "imgs.tsv", "fname2idx.json", "imgs.lineidx"


def uniform_sample(n: int, k: int) -> list[int]:
  """The reference's `uniform_sample` indices: int(i*gap + gap/2) for gap = n/k, deduplicated, sorted."""
  gap = n / k
  return sorted({int(i * gap + gap / 2) for i in range(k)})


def _offsets(tsv: str) -> list[int]:
  lineidx = os.path.join(os.path.dirname(tsv), LINEIDX_NAME)
  if os.path.isfile(lineidx):
    with open(lineidx, "rb") as f:
      return [int(line) for line in f if line.strip()]
  offsets, pos = [], 0
  with open(tsv, "rb") as f:
    for line in f:
      offsets.append(pos)
      pos += len(line)
  return offsets


class _Store:
  def __init__(self, directory: str):
    self.tsv = os.path.join(directory, TSV_NAME)
    try:
      with open(os.path.join(directory, INDEX_NAME), "rb") as f:
        index = json.load(f)
      if not isinstance(index, dict):
        raise ValueError("not a JSON object")
      self.index = {str(k): int(v) for k, v in index.items()}
      self.offsets = _offsets(self.tsv)
      self.size = os.path.getsize(self.tsv)
    except (OSError, ValueError, TypeError) as e:
      raise ValueError(f"TSV frame store {escape(directory)}: {escape(str(e))}") from None

  def row(self, name: str, max_bytes: int) -> list[bytes]:
    row = self.index[name]
    if not 0 <= row < len(self.offsets):
      raise MediaRefused("bad_tsv", f"{escape(self.tsv)}: {escape(name)} maps to row {row} of {len(self.offsets)}")
    start = self.offsets[row]
    end = self.offsets[row + 1] if row + 1 < len(self.offsets) else self.size
    if not 0 <= start < end <= self.size:
      raise MediaRefused("bad_tsv", f"{escape(self.tsv)}: row {row} has offsets {start}..{end}")
    if end - start > max_bytes * 4 // 3 + 2**20:
      raise MediaRefused("file_too_large", f"{escape(self.tsv)} row {row} ({escape(name)}) has {end - start} bytes")
    with open(self.tsv, "rb") as f:
      f.seek(start)
      line = f.read(end - start)
    key, _, payload = line.rstrip(b"\r\n").partition(b"\t")
    if key.strip().decode("utf-8", "replace") != name:
      raise MediaRefused("bad_tsv", f"{escape(self.tsv)} row {row} is {escape(key[:80])!r}, not {escape(name)!r}")
    try:
      frames = [base64.b64decode(x, validate=True) for x in json.loads(payload)]
    except (ValueError, TypeError, binascii.Error) as e:
      raise MediaRefused("bad_tsv", f"{escape(self.tsv)} row {row} ({escape(name)}): not a JSON list of base64 "
                         f"images ({escape(str(e))[:80]})") from None
    if not frames:
      raise MediaRefused("bad_tsv", f"{escape(self.tsv)} row {row} ({escape(name)}) holds no frames")
    return frames


class TsvStores:
  """Every store (a directory with imgs.tsv + fname2idx.json) under `folder`, at most 3 levels down."""

  def __init__(self, folder: str):
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"TSV frame folder {escape(folder)} is not a directory")
    self.stores = []
    for here, dirs, files in os.walk(folder):
      dirs[:] = sorted(dirs) if here[len(folder):].count(os.sep) < 3 else []
      if TSV_NAME in files and INDEX_NAME in files:
        self.stores.append(_Store(here))
    if not self.stores:
      raise ValueError(f"TSV frame folder {escape(folder)} holds no {TSV_NAME} with a {INDEX_NAME} beside it")

  def frames(self, name: str, max_bytes: int) -> list[bytes] | None:
    """The JPEG bytes of video `name`, or None when no store has it (it is then read as a file)."""
    for store in self.stores:
      if name in store.index:
        return store.row(name, max_bytes)
    return None


@dataclasses.dataclass(frozen=True)
class FrameListClip:
  frames: np.ndarray  # uint8 [N, S, S, 3]
  timestamps: list[float]
  indices: list[int]


def frame_list_timestamps(n: int, indices: list[int], stored, start_sec: float | None,
                          end_sec: float | None) -> list[float]:
  """The reference's timestamps of a TSV video's sampled frames: the sample's own `timestamps` at `indices`, else
  1-fps positions over [start_sec (0), end_sec (n)) relative to the clip start, rounded to 2 decimals."""
  keep = set(indices)
  if stored is not None and len(stored):
    return [float(t) for i, t in enumerate(stored) if i in keep]
  start = 0.0 if start_sec is None else start_sec
  end = float(n) if end_sec is None else end_sec
  grid = uniform_sample(round(end - start), n)
  return [round(float(t), 2) for i, t in enumerate(grid) if i in keep]


def read_frame_list(blobs, *, num_frames: int | None, image_size: int, stored_timestamps=None,
                    start_sec: float | None = None, end_sec: float | None = None, min_frames: int = 2) -> FrameListClip:
  """JPEG frames of a TSV video -> the sampled, resized frames and their timestamps. Raises BadSampleError.

  The reference keeps `uniform_sample(frames, min(num_frames, n))` for the timestamps but feeds all n frames
  (SPEC §11.9); up to num_frames frames both agree, beyond it we feed the sampled frames."""
  n = len(blobs)
  if n == 0:
    raise BadSampleError("zero_frames", "the TSV row holds no frames")
  indices = uniform_sample(n, min(num_frames or n, n))
  timestamps = frame_list_timestamps(n, indices, stored_timestamps, start_sec, end_sec)
  if len(timestamps) != len(indices):
    raise BadSampleError("bad_conversation", f"{len(timestamps)} timestamps for {len(indices)} sampled frames")
  if len(indices) < min_frames:
    raise BadSampleError("too_few_frames", f"{len(indices)} frame(s) in the TSV row, fewer than {min_frames}")
  frames = np.stack([resize_image(decode_image(bytes(blobs[i])), image_size) for i in indices])
  return FrameListClip(frames=frames, timestamps=timestamps, indices=indices)
