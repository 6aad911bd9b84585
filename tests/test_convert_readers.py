"""The lazy safetensors reader: single files, sharded directories, dtypes, and refusing pickles or
corrupt files with messages that name the file."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from qv_jax.convert.cli import main
from qv_jax.convert.readers import (CheckpointReadError, PickledCheckpointError, SafetensorsReader,
                                    read_config_json)


def test_reads_every_dtype_and_shape_of_a_single_file(tmp_path):
  tensors = {
      "a": torch.randn(3, 4),
      "b.bf16": torch.randn(5, 2).to(torch.bfloat16),
      "c.half": torch.randn(7).half(),
      "d.int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
      "e.scalar": torch.tensor(2.5),
      "f.empty": torch.zeros(0, 3),
  }
  save_torch(tensors, str(tmp_path / "model.safetensors"))
  with SafetensorsReader(tmp_path) as reader:
    assert sorted(reader.names()) == sorted(tensors)
    assert reader.shape("b.bf16") == (5, 2) and reader.dtype("b.bf16") == np.dtype(ml_dtypes.bfloat16)
    assert reader.nbytes("a") == 48 and reader.total_bytes() == 48 + 20 + 14 + 48 + 4 + 0
    for name, t in tensors.items():
      ours = reader.load(name)
      assert ours.shape == tuple(t.shape)
      np.testing.assert_array_equal(ours.astype(np.float64), t.to(torch.float64).numpy())


def test_sharded_directory_follows_the_index(tmp_path):
  rng = np.random.RandomState(0)
  shards = {"model-00001-of-00002.safetensors": {"x.0": rng.randn(2, 2).astype(np.float32)},
            "model-00002-of-00002.safetensors": {"x.1": rng.randn(3).astype(np.float32),
                                                 "y": rng.randn(1, 4).astype(np.float32)}}
  weight_map = {}
  for file, tensors in shards.items():
    save_numpy(tensors, str(tmp_path / file))
    weight_map.update({name: file for name in tensors})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
  reader = SafetensorsReader(tmp_path)
  assert sorted(reader.names()) == ["x.0", "x.1", "y"]
  np.testing.assert_array_equal(reader.load("y"), shards["model-00002-of-00002.safetensors"]["y"])
  assert read_config_json(tmp_path) == {"model_type": "qwen2"}

  weight_map["z"] = "model-00002-of-00002.safetensors"
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  with pytest.raises(CheckpointReadError, match="does not match the shard files.*'z"):
    SafetensorsReader(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickled_checkpoints_are_refused(tmp_path, name, capsys):
  src = tmp_path / "src"
  src.mkdir()
  torch.save({"w": torch.zeros(2)}, src / name)
  with pytest.raises(PickledCheckpointError, match=f"refusing pickled checkpoint file.*{name}"):
    SafetensorsReader(src)
  with pytest.raises(PickledCheckpointError, match=name):
    SafetensorsReader(src / name)
  assert main(["--source", str(src), "--output", str(tmp_path / "out"), "--quiet"]) == 2
  assert "refusing pickled" in capsys.readouterr().err
  assert not (tmp_path / "out" / "params").exists()


def test_pickles_beside_safetensors_are_ignored(tmp_path):
  save_numpy({"w": np.ones(2, np.float32)}, str(tmp_path / "model.safetensors"))
  torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
  assert SafetensorsReader(tmp_path).names() == ["w"]


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
  file = tmp_path / "model.safetensors"
  save_numpy({"w": np.ones((100,), np.float32)}, str(file))
  data = file.read_bytes()
  file.write_bytes(data[:-10])
  with pytest.raises(CheckpointReadError, match=r"model\.safetensors: tensor 'w'.*truncated or corrupt"):
    SafetensorsReader(file)
  file.write_bytes(struct.pack("<Q", 10) + b"{not json}")
  with pytest.raises(CheckpointReadError, match=r"model\.safetensors: corrupt safetensors header"):
    SafetensorsReader(file)
  file.write_bytes(b"abc")
  with pytest.raises(CheckpointReadError, match="not a safetensors file"):
    SafetensorsReader(file)


def test_empty_and_missing_directories(tmp_path):
  with pytest.raises(CheckpointReadError, match="no \\*.safetensors files"):
    SafetensorsReader(tmp_path)
  with pytest.raises(CheckpointReadError, match="no such file"):
    SafetensorsReader(tmp_path / "nope")
