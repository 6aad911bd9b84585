"""`qv-convert` against hostile or careless inputs (issue 13 items 6-10, issue 8 item 10): files outside
the source, malformed headers and indexes, mis-shaped and huge tensors, and outputs that would clobber
a source or an earlier conversion. Every source here is built in the test."""

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from qv_jax.convert import readers
from qv_jax.convert.cli import convert, main
from qv_jax.convert.fixtures import qwen2_layout, write_config_json
from qv_jax.convert.mapping import MappingError
from qv_jax.convert.readers import CheckpointReadError, SafetensorsReader, read_config_json
from qv_jax.convert.writer import load_converted

SECRET = "SECRET_TENSOR_NAME_42"


def raw_safetensors(path, header, data_size=None):
  """A safetensors file with exactly this header (any JSON) and `data_size` zero bytes of data."""
  if data_size is None:
    data_size = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    f.truncate(8 + len(raw) + data_size)
  return path


def tiny_decoder(directory, vocab=512, hidden=64, heads=4, kv=2, inter=128, layers=2, lm_head_rows=None,
                 seed=0):
  """A Qwen2-layout checkpoint (random f32) with its config.json; lm_head_rows mis-shapes lm_head."""
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  shapes, config = qwen2_layout(vocab, hidden, heads, kv, inter, layers, lm_head_rows)
  tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
  save_file(tensors, str(directory / "model.safetensors"))
  write_config_json(directory, config)
  return tensors


@pytest.fixture
def secret(tmp_path):
  """A valid safetensors file outside every source, and a spy recording every file the reader opens."""
  outside = tmp_path / "outside"
  outside.mkdir()
  save_file({SECRET: np.arange(4, dtype=np.float32)}, str(outside / "secret.safetensors"))
  (outside / "config.json").write_text(json.dumps({"model_type": "qwen2", "token": SECRET}))
  return outside


@pytest.fixture
def opened(monkeypatch):
  files = []
  real_open = open

  def spy(file, *args, **kw):
    files.append(os.path.realpath(file))
    return real_open(file, *args, **kw)

  monkeypatch.setattr(readers, "open", spy, raising=False)
  return files


# --- 13.6: every file must resolve inside --source ---------------------------------------------------

@pytest.mark.parametrize("entry", ["../outside/secret.safetensors", "ABSOLUTE"])
def test_index_entries_outside_the_source_are_refused_before_opening(tmp_path, secret, opened, entry):
  src = tmp_path / "src"
  src.mkdir()
  save_file({"w": np.ones(2, np.float32)}, str(src / "model-1.safetensors"))
  entry = str(secret / "secret.safetensors") if entry == "ABSOLUTE" else entry
  (src / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"w": "model-1.safetensors", "x": entry}}))
  with pytest.raises(CheckpointReadError, match="outside the source directory") as info:
    SafetensorsReader(src)
  assert SECRET not in str(info.value) and "\n" not in str(info.value)
  assert not [f for f in opened if f.startswith(str(secret))]


def test_symlinks_out_of_the_source_are_refused(tmp_path, secret, opened, capsys):
  src = tmp_path / "src"
  src.mkdir()
  (src / "model.safetensors").symlink_to(secret / "secret.safetensors")
  with pytest.raises(CheckpointReadError, match="model.safetensors: shard file resolves to .*outside"):
    SafetensorsReader(src)
  (src / "model.safetensors").unlink()
  tiny_decoder(src)
  (src / "config.json").unlink()
  (src / "config.json").symlink_to(secret / "config.json")
  with pytest.raises(CheckpointReadError, match="config.json: config.json resolves to .*outside"):
    read_config_json(src)
  assert main(["--source", str(src), "--output", str(tmp_path / "out"), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "outside the source directory" in err and SECRET not in err and err.count("\n") == 1
  assert not [f for f in opened if f.startswith(str(secret))]


def test_hub_cache_snapshot_links_into_its_blobs_are_followed(tmp_path):
  repo = tmp_path / "hub" / "models--org--tiny"
  (repo / "blobs").mkdir(parents=True)
  snapshot = repo / "snapshots" / "abc123"
  snapshot.mkdir(parents=True)
  save_file({"w": np.arange(3, dtype=np.float32)}, str(repo / "blobs" / "0f1e2d"))
  (snapshot / "model.safetensors").symlink_to("../../blobs/0f1e2d")
  np.testing.assert_array_equal(SafetensorsReader(snapshot).load("w"), np.arange(3))


def test_a_fifo_named_like_a_shard_is_refused_without_blocking(tmp_path):
  os.mkfifo(tmp_path / "model.safetensors")
  holder = os.open(tmp_path / "model.safetensors", os.O_RDWR | os.O_NONBLOCK)   # an open() would not block
  os.write(holder, bytes(8))                                                    # nor its first read
  try:
    with pytest.raises(CheckpointReadError, match="not a regular file"):
      SafetensorsReader(tmp_path)
  finally:
    os.close(holder)


# --- 13.7 / 13.8: header and index checks ------------------------------------------------------------

F32x4 = dict(dtype="F32", shape=[4])


@pytest.mark.parametrize("header,data_size,message", [
    ({"a": dict(F32x4, data_offsets=[0, 16]), "b": dict(F32x4, data_offsets=[8, 24])}, 24, "overlap"),
    ({"a": dict(F32x4, data_offsets=[0, 16]), "b": dict(F32x4, data_offsets=[0, 16])}, 16, "overlap"),
    ({"a": dict(F32x4, data_offsets=[0, 16]), "b": dict(F32x4, data_offsets=[20, 36])}, 36, "belong to no tensor"),
    ({"a": dict(F32x4, data_offsets=[0, 16])}, 24, "8 bytes after the last tensor"),
    ({"a": dict(dtype="F32", shape=[-4], data_offsets=[16, 0])}, 16, "non-negative integers"),
    ({"a": dict(dtype="F32", shape=[-2, -2], data_offsets=[0, 16])}, 16, "shape must be a list of non-negative"),
    ({"a": dict(dtype=["F32"], shape=[4], data_offsets=[0, 16])}, 16, "dtype must be a string.*JSON list"),
    ({"a": dict(dtype="F32", shape=[4], data_offsets=["0", "16"])}, 16, "data_offsets must be two non-negative"),
    ({"a": dict(dtype="F32", shape=[4.0], data_offsets=[0, 16])}, 16, "shape must be a list"),
    ({"a": dict(dtype="F32", shape=[4], data_offsets=[0, 16, 32])}, 16, "data_offsets must be two"),
    ({"a": dict(dtype="F32", shape=[4])}, 16, "lacks data_offsets"),
    ({"a": [1, 2]}, 16, "header entry must be an object"),
    ([{"a": 1}], 16, "must be a JSON object .*got a JSON list"),
    ({"__metadata__": [1], "a": dict(F32x4, data_offsets=[0, 16])}, 16, "__metadata__ must be an object"),
])
def test_malformed_headers_give_one_line_naming_the_file(tmp_path, header, data_size, message):
  file = raw_safetensors(tmp_path / "model.safetensors", header, data_size)
  with pytest.raises(CheckpointReadError, match=message) as info:
    SafetensorsReader(tmp_path)
  assert str(info.value).startswith(str(file)) and "\n" not in str(info.value)


def test_offsets_in_any_order_that_tile_the_data_are_accepted(tmp_path):
  header = {"a": dict(F32x4, data_offsets=[16, 32]), "b": dict(dtype="I8", shape=[0], data_offsets=[16, 16]),
            "c": dict(F32x4, data_offsets=[0, 16])}
  raw_safetensors(tmp_path / "model.safetensors", header)
  reader = SafetensorsReader(tmp_path)
  assert reader.shape("b") == (0,) and reader.load("a").shape == (4,)


@pytest.mark.parametrize("index,message", [
    ({"weight_map": ["model.safetensors"]}, '"weight_map" must be an object .*got a JSON list'),
    ({"weight_map": {"w": 1}}, "weight_map entry 'w' names a JSON integer 1, expected a shard file name"),
    ({"metadata": {}}, '"weight_map" must be an object .*got JSON null'),
    ([1, 2], 'expected a JSON object with a "weight_map", got a JSON list'),
])
def test_malformed_indexes_give_one_line_naming_the_index(tmp_path, index, message):
  save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "model.safetensors"))
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(CheckpointReadError, match=message) as info:
    SafetensorsReader(tmp_path)
  assert str(info.value).startswith(str(tmp_path / "model.safetensors.index.json"))
  assert "\n" not in str(info.value)


def test_config_json_that_is_not_an_object_is_refused(tmp_path, capsys):
  tiny_decoder(tmp_path / "src")
  (tmp_path / "src" / "config.json").write_text("[1, 2]")
  assert main(["--source", str(tmp_path / "src"), "--output", str(tmp_path / "out"), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "config.json: expected a JSON object, got a JSON list" in err and err.count("\n") == 1


def test_a_huge_tensor_over_a_sparse_file_is_refused_without_allocating(tmp_path, monkeypatch):
  """10^12 f32 elements (3.6 TiB) claimed by a header over a sparse file of that size."""
  src = tmp_path / "src"
  tiny_decoder(src)
  with SafetensorsReader(src) as r:
    tensors = {n: r.load(n) for n in r.names()}
  header, offset = {}, 0
  for name, t in tensors.items():
    shape = (10**6, 10**6) if name == "lm_head.weight" else t.shape
    nbytes = int(np.prod(shape)) * 4
    header[name] = dict(dtype="F32", shape=list(shape), data_offsets=[offset, offset + nbytes])
    offset += nbytes
  raw_safetensors(src / "model.safetensors", header)
  assert os.stat(src / "model.safetensors").st_size > 4 * 10**12
  loaded = []
  monkeypatch.setattr(SafetensorsReader, "load", lambda self, name: loaded.append(name))
  with pytest.raises(MappingError, match=r"lm_head\.weight: \[1000000, 1000000\] float32") as info:
    convert(src, tmp_path / "out", size="tiny", progress=False)
  assert str(src) in str(info.value) and loaded == []


# --- 13.9: shapes are checked from the headers before any tensor is read -----------------------------

def test_a_misshaped_lm_head_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch):
  tiny_decoder(tmp_path / "src", lm_head_rows=4096)
  loaded = []
  load = SafetensorsReader.load
  monkeypatch.setattr(SafetensorsReader, "load", lambda self, name: loaded.append(name) or load(self, name))
  with pytest.raises(MappingError, match=r"decoder/lm_head/kernel: got \(64, 4096\), expected \(64, 512\)"):
    convert(tmp_path / "src", tmp_path / "out", size="tiny", progress=False)
  assert loaded == []
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


# --- 13.10: the output ---------------------------------------------------------------------------------

def _listing(directory):
  return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_a_non_empty_output_is_refused_without_overwrite_and_a_foreign_one_always(tmp_path, capsys):
  tiny_decoder(tmp_path / "src")
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  args = ["--source", str(tmp_path / "src"), "--output", str(out), "--quiet"]
  assert main(args) == 2
  assert "is not empty (notes.txt); pass --overwrite" in capsys.readouterr().err
  assert main(args + ["--overwrite"]) == 2
  assert "holds files a conversion does not write (notes.txt)" in capsys.readouterr().err
  assert _listing(out) == ["notes.txt"]
  out.joinpath("notes.txt").unlink()
  assert main(args) == 0                                # an empty directory is fine
  assert _listing(out)[:3] == ["config.json", "conversion.json", "params"]


def test_a_failing_overwrite_leaves_the_previous_conversion_intact(tmp_path, monkeypatch):
  first = tiny_decoder(tmp_path / "src")
  out = tmp_path / "out"
  convert(tmp_path / "src", out, size="tiny", progress=False)
  before = {p: (out / p).read_bytes() for p in _listing(out) if (out / p).is_file()}
  tiny_decoder(tmp_path / "src2", seed=1)
  load, calls = SafetensorsReader.load, []

  def failing(self, name):
    calls.append(name)
    if len(calls) == 5:
      raise CheckpointReadError(f"{self.path}: simulated read error")
    return load(self, name)

  monkeypatch.setattr(SafetensorsReader, "load", failing)
  with pytest.raises(CheckpointReadError, match="simulated read error"):
    convert(tmp_path / "src2", out, size="tiny", progress=False, overwrite=True, flush_bytes=1 << 10)
  assert {p: (out / p).read_bytes() for p in _listing(out) if (out / p).is_file()} == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "src2"]   # no staging left behind
  _, params = load_converted(out, part="decoder")
  np.testing.assert_array_equal(params["norm"]["scale"], first["model.norm.weight"])

  monkeypatch.setattr(SafetensorsReader, "load", load)
  second = tiny_decoder(tmp_path / "src2", seed=1)
  convert(tmp_path / "src2", out, size="tiny", progress=False, overwrite=True)
  _, params = load_converted(out, part="decoder")
  np.testing.assert_array_equal(params["norm"]["scale"], second["model.norm.weight"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "src2"]
  assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask():
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@pytest.mark.parametrize("where", ["equal", "inside", "contains", "file_dir"])
def test_an_output_overlapping_a_source_is_refused(tmp_path, where, capsys):
  src = tmp_path / "src"
  tiny_decoder(src)
  config = (src / "config.json").read_bytes()
  source, output = {"equal": (src, src), "inside": (src, src / "converted"), "contains": (src, tmp_path),
                    "file_dir": (src / "model.safetensors", src)}[where]
  assert main(["--source", str(source), "--output", str(output), "--quiet", "--overwrite"]) == 2
  err = capsys.readouterr().err
  assert ("is inside --source" if where != "contains" else "is inside --output") in err
  assert (src / "config.json").read_bytes() == config and sorted(p.name for p in src.iterdir()) == [
      "config.json", "model.safetensors"]


# --- 8.10: a plain decoder is validated as a decoder only -----------------------------------------------

def test_a_decoder_whose_width_suits_no_compressor_converts(tmp_path):
  tensors = tiny_decoder(tmp_path / "src", vocab=96, hidden=72, heads=4, kv=2, inter=96, layers=1)
  (report,) = convert(tmp_path / "src", tmp_path / "out", progress=False)
  assert report.layout == "decoder"
  config, params = load_converted(tmp_path / "out", part="decoder")
  assert config.model.decoder.hidden_size == 72 and config.model.decoder.head_dim == 18
  np.testing.assert_array_equal(params["lm_head"]["kernel"], tensors["lm_head.weight"].T)


def test_a_conversion_that_does_not_read_back_is_not_committed(tmp_path, monkeypatch):
  from qv_jax.convert import cli
  tiny_decoder(tmp_path / "src")
  write = cli.write_metadata

  def lossy(directory, config, report):
    report["params"].pop("decoder/norm/scale")
    write(directory, config, report)

  monkeypatch.setattr(cli, "write_metadata", lossy)
  with pytest.raises(MappingError, match="does not hold the converted params"):
    convert(tmp_path / "src", tmp_path / "out", size="tiny", progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_file_source_may_be_a_link_but_its_config_json_may_not_leave_its_folder(tmp_path, secret):
  tensors = tiny_decoder(tmp_path / "store")
  src = tmp_path / "src"
  src.mkdir()
  (src / "model.safetensors").symlink_to(tmp_path / "store" / "model.safetensors")
  (src / "config.json").write_bytes((tmp_path / "store" / "config.json").read_bytes())
  convert(src / "model.safetensors", tmp_path / "out", progress=False)
  _, params = load_converted(tmp_path / "out", part="decoder")
  np.testing.assert_array_equal(params["norm"]["scale"], tensors["model.norm.weight"])
  (src / "config.json").unlink()
  (src / "config.json").symlink_to(secret / "config.json")
  with pytest.raises(CheckpointReadError, match="outside the source directory") as info:
    convert(src / "model.safetensors", tmp_path / "out2", progress=False)
  assert SECRET not in str(info.value) and not (tmp_path / "out2").exists()
