"""Lazy safetensors checkpoint reading: one tensor at a time, never the whole file.

`open_checkpoint(path)` takes an HF model directory (one `*.safetensors` file, several, or a sharded
set listed by `model.safetensors.index.json`) or a single `.safetensors` file. Only the JSON headers
are read up front; `load(name)` seeks to one tensor and reads exactly its bytes, so the memory held is
one tensor (the OS page cache is not process memory). Pickled checkpoints (`*.bin`, `*.pt`, `*.pth`,
`*.ckpt`) are refused: unpickling can run arbitrary code.

The safetensors format: an 8-byte little-endian header length n, n bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw little-endian
data; offsets count from the end of the header.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


class CheckpointReadError(ValueError):
  """A checkpoint file or directory cannot be read; the message names the file and the problem."""


class PickledCheckpointError(CheckpointReadError):
  """Only pickled weights were found; they are refused."""


def _refuse_pickles(files: list[Path], where: Path) -> None:
  names = ", ".join(sorted(f.name for f in files))
  raise PickledCheckpointError(
      f"{where}: refusing pickled checkpoint file(s) {names}: loading a pickle can execute arbitrary "
      "code. Convert to safetensors first (e.g. in a trusted environment: "
      "`AutoModel.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`).")


def aligned_empty(shape: tuple[int, ...], dtype, align: int = 4096) -> np.ndarray:
  """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary: JAX's CPU
  backend then wraps it without a copy (numpy's own buffers are only 16-byte aligned)."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start:start + nbytes].view(dtype).reshape(shape)


class _Entry:
  __slots__ = ("file", "dtype", "shape", "start", "end")

  def __init__(self, file, dtype, shape, start, end):
    self.file, self.dtype, self.shape, self.start, self.end = file, dtype, shape, start, end


def read_header(file: Path) -> tuple[dict[str, _Entry], dict]:
  """Parses one safetensors header: ({name: entry}, metadata). Checks offsets against the file size."""
  size = file.stat().st_size
  with open(file, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointReadError(f"{file}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8 or n > 512 << 20:
      raise CheckpointReadError(f"{file}: not a safetensors file (header length {n} for a file of "
                                f"{size} bytes)")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointReadError(f"{file}: corrupt safetensors header ({e})") from None
  base = 8 + n
  metadata = header.pop("__metadata__", None) or {}
  entries = {}
  for name, info in header.items():
    try:
      dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise CheckpointReadError(f"{file}: tensor {name!r} has a malformed header entry {info!r}") from None
    if dtype not in DTYPES:
      raise CheckpointReadError(f"{file}: tensor {name!r} has unsupported dtype {dtype!r}; "
                                f"expected one of {sorted(DTYPES)}")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes or begin < 0 or base + end > size:
      raise CheckpointReadError(
          f"{file}: tensor {name!r} ({dtype} {list(shape)}) has data_offsets [{begin}, {end}] that do "
          f"not hold its {nbytes} bytes inside the {size}-byte file (truncated or corrupt)")
    entries[name] = _Entry(file, DTYPES[dtype], shape, base + begin, base + end)
  return entries, metadata


class SafetensorsReader:
  """Names, shapes and dtypes of every tensor of a checkpoint, and `load(name)` of one at a time."""

  def __init__(self, path: str | os.PathLike):
    path = Path(path)
    if not path.exists():
      raise CheckpointReadError(f"{path}: no such file or directory")
    self.path = path
    self.files = self._files(path)
    self._entries: dict[str, _Entry] = {}
    self.metadata: dict = {}
    for file in self.files:
      entries, metadata = read_header(file)
      clash = sorted(set(entries) & set(self._entries))
      if clash:
        raise CheckpointReadError(f"{file}: tensors {clash[:10]} also appear in "
                                  f"{self._entries[clash[0]].file.name}")
      self._entries.update(entries)
      self.metadata.update(metadata)
    self._check_index()
    self._handles: dict[Path, object] = {}

  @staticmethod
  def _files(path: Path) -> list[Path]:
    if path.is_file():
      if path.suffix in PICKLE_SUFFIXES:
        _refuse_pickles([path], path.parent)
      if path.suffix != ".safetensors":
        raise CheckpointReadError(f"{path}: expected a .safetensors file or a model directory")
      return [path]
    index = path / INDEX_FILE
    if index.exists():
      weight_map = json.loads(index.read_text()).get("weight_map", {})
      files = [path / f for f in sorted(set(weight_map.values()))]
      missing = [f.name for f in files if not f.exists()]
      if missing:
        raise CheckpointReadError(f"{index}: lists shard files that do not exist: {missing}")
      return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
      pickles = [f for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
      if pickles:
        _refuse_pickles(pickles, path)
      raise CheckpointReadError(f"{path}: no *.safetensors files (and no {INDEX_FILE})")
    return files

  def _check_index(self) -> None:
    index = self.path / INDEX_FILE if self.path.is_dir() else None
    if index is None or not index.exists():
      return
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    wrong = [f"{name} (index: {file}, found in: {self._entries[name].file.name if name in self._entries else 'no shard'})"
             for name, file in weight_map.items()
             if name not in self._entries or self._entries[name].file.name != file]
    unlisted = sorted(set(self._entries) - set(weight_map))
    if wrong or unlisted:
      raise CheckpointReadError(f"{index} does not match the shard files: "
                                f"misplaced or missing {wrong[:10]}, unlisted {unlisted[:10]}")

  def names(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entry(name).shape

  def dtype(self, name: str) -> np.dtype:
    return self._entry(name).dtype

  def nbytes(self, name: str) -> int:
    e = self._entry(name)
    return e.end - e.start

  def total_bytes(self) -> int:
    return sum(e.end - e.start for e in self._entries.values())

  def _entry(self, name: str) -> _Entry:
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(f"{self.path}: no tensor named {name!r}") from None

  def load(self, name: str) -> np.ndarray:
    """Reads one tensor into a fresh page-aligned array (native byte order)."""
    e = self._entry(name)
    handle = self._handles.get(e.file)
    if handle is None:
      handle = self._handles[e.file] = open(e.file, "rb")
    out = aligned_empty(e.shape, e.dtype)
    view = out.reshape(-1).view(np.uint8)
    handle.seek(e.start)
    done = 0
    while done < view.size:
      n = handle.readinto(view[done:])
      if not n:
        raise CheckpointReadError(f"{e.file}: tensor {name!r} is truncated")
      done += n
    return out

  def close(self) -> None:
    for handle in self._handles.values():
      handle.close()
    self._handles.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_config_json(path: str | os.PathLike) -> dict | None:
  """The directory's config.json as a dict, or None when there is none."""
  path = Path(path)
  file = (path if path.is_dir() else path.parent) / "config.json"
  if not file.exists():
    return None
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointReadError(f"{file}: not valid JSON ({e})") from None


def open_checkpoint(path: str | os.PathLike) -> SafetensorsReader:
  return SafetensorsReader(path)
