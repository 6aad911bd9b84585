"""Lazy safetensors checkpoint reading: one tensor at a time, never the whole file.

`open_checkpoint(path)` takes an HF model directory (one `*.safetensors` file, several, or a sharded
set listed by `model.safetensors.index.json`) or a single `.safetensors` file. Only the JSON headers
are read up front; `load(name)` seeks to one tensor and reads exactly its bytes, so the memory held is
one tensor (the OS page cache is not process memory). Pickled checkpoints (`*.bin`, `*.pt`, `*.pth`,
`*.ckpt`) are refused: unpickling can run arbitrary code. Every file opened (index, shards,
config.json) must be a regular file resolving inside the source directory (`source_roots`), checked
before it is opened, and every header is validated (`read_header`) before any tensor is read.

The safetensors format: an 8-byte little-endian header length n, n bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw little-endian
data; offsets count from the end of the header.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000   # the safetensors library's own limit
MAX_JSON_BYTES = 64 << 20        # index and config.json

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
  if dtype.itemsize == 0:
    return np.empty(shape, dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start:start + nbytes].view(dtype).reshape(shape)


class _Entry:
  __slots__ = ("file", "dtype", "shape", "start", "end")

  def __init__(self, file, dtype, shape, start, end):
    self.file, self.dtype, self.shape, self.start, self.end = file, dtype, shape, start, end


def _kind(value) -> str:
  """'a JSON list', 'a JSON string', ... for error messages."""
  names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number"}
  return "JSON null" if value is None else f"a JSON {names.get(type(value), type(value).__name__)}"


def _short(value, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


def source_roots(path: Path) -> tuple[Path, ...]:
  """The directories a source's files may resolve into: the source directory (for a file, its folder) and,
  for a Hugging Face hub cache snapshot (`models--X/snapshots/REV`, whose files are symlinks to
  `models--X/blobs/`), that repository's `blobs/`."""
  root = (path if path.is_dir() else path.parent).resolve()
  roots = [root]
  blobs = root.parent.parent / "blobs"
  if root.parent.name == "snapshots" and blobs.is_dir():
    roots.append(blobs.resolve())
  return tuple(roots)


def checked_file(file: Path, roots: tuple[Path, ...] | None, what: str) -> Path:
  """The real path of `file`, refused (without opening it) unless it is a regular file resolving inside
  one of `roots` (None: anywhere, for a file the user named)."""
  try:
    real = Path(file).resolve(strict=True)
  except FileNotFoundError:
    raise CheckpointReadError(f"{file}: {what} does not exist") from None
  except (OSError, RuntimeError) as e:
    reason = getattr(e, "strerror", None) or e
    raise CheckpointReadError(f"{file}: cannot resolve the {what} ({reason})") from None
  if roots is not None and not any(real == r or real.is_relative_to(r) for r in roots):
    raise CheckpointReadError(f"{file}: {what} resolves to {real}, outside the source directory {roots[0]}; "
                              "refusing to open it")
  if not stat.S_ISREG(real.stat().st_mode):
    raise CheckpointReadError(f"{file}: {what} is not a regular file; refusing to open it")
  return real


def read_json(file: Path, roots: tuple[Path, ...] | None, what: str, limit: int = MAX_JSON_BYTES):
  """A small JSON file of a source (index, config.json), checked by `checked_file` and read with a bound."""
  real = checked_file(file, roots, what)
  with open(real, "rb") as f:
    raw = f.read(limit + 1)
  if len(raw) > limit:
    raise CheckpointReadError(f"{file}: {what} is larger than {limit >> 20} MiB; refusing to parse it")
  try:
    return json.loads(raw)
  except json.JSONDecodeError as e:
    raise CheckpointReadError(f"{file}: {what} is not valid JSON ({e.msg} at line {e.lineno} column "
                              f"{e.colno})") from None
  except UnicodeDecodeError as e:
    raise CheckpointReadError(f"{file}: {what} is not UTF-8 text (byte {e.start})") from None


def _parse_entry(file: Path, name: str, info) -> tuple[np.dtype, tuple[int, ...], int, int]:
  """(dtype, shape, begin, end) of one header entry, or a one-line error saying which field is wrong."""
  where = f"{file}: tensor {_short(name)}"
  if not isinstance(info, dict):
    raise CheckpointReadError(f"{where}: header entry must be an object with dtype, shape and data_offsets, "
                              f"got {_kind(info)}")
  missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
  if missing:
    raise CheckpointReadError(f"{where}: header entry lacks {', '.join(missing)}")
  dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
  if not isinstance(dtype, str):
    raise CheckpointReadError(f"{where}: dtype must be a string such as \"F32\", got {_kind(dtype)}")
  if dtype not in DTYPES:
    raise CheckpointReadError(f"{where}: unsupported dtype {_short(dtype)}; expected one of {sorted(DTYPES)}")
  if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
    raise CheckpointReadError(f"{where}: shape must be a list of non-negative integers, got {_short(shape)}")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
    raise CheckpointReadError(f"{where}: data_offsets must be two non-negative integers [begin, end], got "
                              f"{_short(offsets)}")
  begin, end = offsets
  nbytes = math.prod(shape) * DTYPES[dtype].itemsize
  if end - begin != nbytes:
    raise CheckpointReadError(f"{where} ({dtype} {shape}) has data_offsets [{begin}, {end}] that do not span "
                              f"its {nbytes} bytes (corrupt header)")
  return DTYPES[dtype], tuple(shape), begin, end


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_tiling(file: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
  """The tensors must tile the data section exactly, as the safetensors library requires: sorted by
  offset, each starts where the previous ends (no overlap, no gap) and the last ends at the file's end."""
  at, previous = 0, None
  for begin, end, name in sorted(spans):
    if begin < at:
      raise CheckpointReadError(f"{file}: tensors {_short(previous)} and {_short(name)} overlap (data_offsets "
                                f"[{begin}, {end}] start before byte {at}) (corrupt header)")
    if begin > at:
      raise CheckpointReadError(f"{file}: bytes [{at}, {begin}) of the data section belong to no tensor "
                                f"(before {_short(name)}) (corrupt header)")
    at, previous = end, name
  if at > data_size:
    raise CheckpointReadError(f"{file}: tensor {_short(previous)} ends at byte {at} of a {data_size}-byte "
                              "data section (truncated or corrupt)")
  if at < data_size:
    raise CheckpointReadError(f"{file}: {data_size - at} bytes after the last tensor belong to no tensor "
                              "(corrupt header)")


def read_header(real: Path, file: Path | None = None) -> tuple[dict[str, _Entry], dict]:
  """Parses and checks one safetensors header: ({name: entry}, metadata). Every entry is validated
  (types, non-negative dims, offsets tiling the data section, which must fit the file) before any
  tensor is read, so no later read or allocation exceeds the bytes the file holds. `real` is opened;
  `file` (default `real`) is the name entries and messages carry (a shard's name, not its link target)."""
  file = real if file is None else file
  st = os.stat(real)
  if not stat.S_ISREG(st.st_mode):
    raise CheckpointReadError(f"{file}: not a regular file; refusing to open it")
  size = st.st_size
  with open(real, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointReadError(f"{file}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8 or n > MAX_HEADER_BYTES:
      raise CheckpointReadError(f"{file}: not a safetensors file (its first 8 bytes give a header length "
                                f"beyond the {size}-byte file or the {MAX_HEADER_BYTES}-byte limit)")
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except json.JSONDecodeError as e:
    raise CheckpointReadError(f"{file}: corrupt safetensors header (invalid JSON: {e.msg} at byte "
                              f"{e.pos})") from None
  except UnicodeDecodeError as e:
    raise CheckpointReadError(f"{file}: corrupt safetensors header (not UTF-8 at byte {e.start})") from None
  del raw
  if not isinstance(header, dict):
    raise CheckpointReadError(f"{file}: corrupt safetensors header (must be a JSON object "
                              f"{{tensor name: entry}}, got {_kind(header)})")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict):
    raise CheckpointReadError(f"{file}: corrupt safetensors header (__metadata__ must be an object, got "
                              f"{_kind(metadata)})")
  base = 8 + n
  parsed = {name: _parse_entry(file, name, info) for name, info in header.items()}
  _check_tiling(file, [(begin, end, name) for name, (_, _, begin, end) in parsed.items()], size - base)
  entries = {name: _Entry(file, dtype, shape, base + begin, base + end)
             for name, (dtype, shape, begin, end) in parsed.items()}
  return entries, metadata


class SafetensorsReader:
  """Names, shapes and dtypes of every tensor of a checkpoint, and `load(name)` of one at a time.

  Every file it opens (index, shards) must be a regular file resolving inside the source directory
  (`source_roots`); it is checked before it is opened."""

  def __init__(self, path: str | os.PathLike):
    path = Path(path)
    if not os.path.lexists(path):
      raise CheckpointReadError(f"{path}: no such file or directory")
    self.path = path
    self.roots = source_roots(path)
    self._real: dict[Path, Path] = {}
    weight_map = self._weight_map()
    self.files = self._files(path, weight_map)
    self._entries: dict[str, _Entry] = {}
    self.metadata: dict = {}
    for file in self.files:
      entries, metadata = read_header(self._real[file], file)
      clash = sorted(set(entries) & set(self._entries))
      if clash:
        raise CheckpointReadError(f"{file}: tensors {clash[:10]} also appear in "
                                  f"{self._entries[clash[0]].file.name}")
      self._entries.update(entries)
      self.metadata.update(metadata)
    if weight_map is not None:
      self._check_index(weight_map)
    self._handles: dict[Path, object] = {}

  def _weight_map(self) -> dict[str, str] | None:
    """The index's {tensor name: shard file}, checked to be that (None without an index)."""
    index = self.path / INDEX_FILE
    if not self.path.is_dir() or not os.path.lexists(index):
      return None
    data = read_json(index, self.roots, "index")
    if not isinstance(data, dict):
      raise CheckpointReadError(f"{index}: expected a JSON object with a \"weight_map\", got {_kind(data)}")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointReadError(f"{index}: \"weight_map\" must be an object {{tensor name: shard file}}, "
                                f"got {_kind(weight_map)}")
    bad = [(name, file) for name, file in weight_map.items() if not isinstance(file, str) or not file]
    if bad:
      raise CheckpointReadError(f"{index}: weight_map entry {_short(bad[0][0])} names {_kind(bad[0][1])} "
                                f"{_short(bad[0][1])}, expected a shard file name ({len(bad)} such entries)")
    return weight_map

  def _files(self, path: Path, weight_map: dict[str, str] | None) -> list[Path]:
    if path.is_file():
      if path.suffix in PICKLE_SUFFIXES:
        _refuse_pickles([path], path.parent)
      if path.suffix != ".safetensors":
        raise CheckpointReadError(f"{path}: expected a .safetensors file or a model directory")
      self._real[path] = checked_file(path, None, "checkpoint file")
      return [path]
    if not path.is_dir():
      raise CheckpointReadError(f"{path}: not a file or directory (a dangling link?)")
    if weight_map is not None:
      files = sorted({path / f for f in weight_map.values()})
      missing = [str(f.relative_to(path)) if f.is_relative_to(path) else str(f)
                 for f in files if not os.path.lexists(f)]
      if missing:
        raise CheckpointReadError(f"{path / INDEX_FILE}: lists shard files that do not exist: {missing[:10]}")
    else:
      files = sorted(path.glob("*.safetensors"))
      if not files:
        pickles = [f for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
        if pickles:
          _refuse_pickles(pickles, path)
        raise CheckpointReadError(f"{path}: no *.safetensors files (and no {INDEX_FILE})")
    for f in files:
      self._real[f] = checked_file(f, self.roots, "shard file")
    return files

  def _check_index(self, weight_map: dict[str, str]) -> None:
    index = self.path / INDEX_FILE
    wrong = [f"{name} (index: {file}, found in: {self._entries[name].file.name if name in self._entries else 'no shard'})"
             for name, file in weight_map.items()
             if name not in self._entries or self._entries[name].file != self.path / file]
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
      handle = self._handles[e.file] = open(self._real[e.file], "rb")
    try:
      out = aligned_empty(e.shape, e.dtype)
    except MemoryError:
      raise CheckpointReadError(f"{e.file}: tensor {name!r} ({e.end - e.start} bytes) does not fit in "
                                "memory") from None
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
  """The source's config.json as a dict, or None when there is none. Like every file of a source it
  must resolve inside the source directory (`source_roots`)."""
  path = Path(path)
  file = (path if path.is_dir() else path.parent) / "config.json"
  if not os.path.lexists(file):
    return None
  config = read_json(file, source_roots(path), "config.json")
  if not isinstance(config, dict):
    raise CheckpointReadError(f"{file}: expected a JSON object, got {_kind(config)}")
  return config


def open_checkpoint(path: str | os.PathLike) -> SafetensorsReader:
  return SafetensorsReader(path)
