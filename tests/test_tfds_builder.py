"""The TFDS builder and its CLI: jsonl + media root -> ArrayRecord records, read back without TensorFlow."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipeline import tfds_builder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _conv(question: str, answer: str = "ok") -> list[dict]:
  return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A jsonl with every kind of line, media files with distinct bytes, and a validation jsonl."""
  root = tmp_path_factory.mktemp("corpus")
  media = root / "media"
  (media / "sub").mkdir(parents=True)
  blobs = {"a.mp4": os.urandom(3000), "sub/b.mp4": b"\x00\x01" * 700, "x.png": os.urandom(500),
           "y.jpg": os.urandom(800), "empty.mp4": b""}
  for rel, data in blobs.items():
    (media / rel).write_bytes(data)
  lines = [
      json.dumps({"id": "v1", "video": "a.mp4", "conversations": _conv("<image>\nWhat happens?"),
                  "start": 1.5, "end": 4}).encode(),
      json.dumps({"id": "v2", "video": "missing.mp4", "conversations": _conv("<image>\nq")}).encode(),
      b"",
      json.dumps({"id": "i1", "image": ["x.png", "y.jpg"], "conversations": _conv("<image>\n<image>\nq")}).encode(),
      b"{this is not json",
      json.dumps({"id": "t1", "conversations": _conv("plain text, no media")}).encode(),
      b'{"id": "u1", "conversations": [{"from": "human", "value": "bad \xff\xfe bytes"}]}',
      json.dumps({"id": "v3", "video": "sub/b.mp4", "conversations": _conv("<image>\nq", "caf\u00e9 \u2603")}).encode(),
      json.dumps({"id": "e1", "video": "empty.mp4", "conversations": []}).encode(),
      json.dumps(["not", "an", "object"]).encode(),
  ]
  (root / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  (root / "val.jsonl").write_text(json.dumps({"id": "val1", "image": "x.png", "conversations": _conv("<image>")})
                                  + "\n")
  return root, blobs


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
  """Built once through the CLI, in a subprocess (a fresh interpreter: nothing registered in this process)."""
  root, _ = corpus
  out = tmp_path_factory.mktemp("tfds")
  cmd = [sys.executable, "-m", "data_pipeline.build", "--jsonl", str(root / "train.jsonl"), "--media-root",
         str(root / "media"), "--data-dir", str(out), "--name", "tiny_clips", "--validation-jsonl",
         str(root / "val.jsonl")]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr
  return out, json.loads(proc.stdout), proc.stderr


def test_tensorflow_is_not_installed():
  assert importlib.util.find_spec("tensorflow") is None


def test_cli_prints_counts_and_warns_per_record(built):
  _, report, stderr = built
  train = report["splits"]["train"]
  assert report["name"] == "tiny_clips" and report["version"] == tfds_builder.DATASET_VERSION
  assert train["written"] == 9  # one record per non-blank line
  assert train["skipped"] == {"missing_file": 1, "bad_json": 2}
  assert report["splits"]["validation"]["written"] == 1
  assert "missing.mp4" in stderr and "train.jsonl:2" in stderr  # the logged reason names file and line
  assert "train.jsonl:5" in stderr and "not valid JSON" in stderr


def test_records_read_back_in_jsonl_order(built, corpus):
  out, _, _ = built
  _, blobs = corpus
  source = tfds_builder.open_split(str(out), "tiny_clips", "train")
  records = [source[i] for i in range(len(source))]
  assert [r["origin"].decode() for r in records] == [f"train.jsonl:{n}" for n in (1, 2, 4, 5, 6, 7, 8, 9, 10)]
  v1, v2, i1, bad, t1, u1, v3, e1, arr = records
  assert v1["modality"] == b"video" and list(v1["media"]) == [blobs["a.mp4"]]
  assert list(v1["media_path"]) == [b"a.mp4"] and v1["id"] == b"v1" and v1["error"] == b""
  assert json.loads(v1["conversations"]) == _conv("<image>\nWhat happens?")
  assert v1["start"] == pytest.approx(1.5) and v1["end"] == pytest.approx(4.0)
  assert math.isnan(float(t1["start"])) and math.isnan(float(t1["end"]))
  assert v2["error"] == b"missing_file" and len(v2["media"]) == 0 and b"missing.mp4" in v2["error_detail"]
  assert i1["modality"] == b"image" and list(i1["media"]) == [blobs["x.png"], blobs["y.jpg"]]
  assert bad["error"] == b"bad_json" and arr["error"] == b"bad_json"
  assert t1["modality"] == b"text" and len(t1["media"]) == 0
  assert json.loads(v3["conversations"])[1]["value"] == "caf\u00e9 \u2603"
  assert list(v3["media"]) == [blobs["sub/b.mp4"]]
  # Undecodable bytes survive as escaped surrogates, so the prompt step can reject the text (bad_text).
  value = json.loads(u1["conversations"])[0]["value"]
  with pytest.raises(UnicodeEncodeError):
    value.encode("utf-8")
  assert e1["error"] == b"" and list(e1["media"]) == [b""]  # content problems are the decoder's to find
  val = tfds_builder.open_split(str(out), "tiny_clips", "validation")
  assert len(val) == 1 and val[0]["id"] == b"val1"


def test_data_source_is_random_access_and_picklable(built):
  import pickle
  out, _, _ = built
  source = tfds.data_source("tiny_clips", data_dir=str(out))["train"]
  clone = pickle.loads(pickle.dumps(source))
  assert clone[6]["id"] == source[6]["id"] == b"v3"


def test_open_split_errors_name_the_directory(built, tmp_path):
  out, _, _ = built
  with pytest.raises(tfds_builder.NoRecordsError, match=str(tmp_path / "nope")):
    tfds_builder.open_split(str(tmp_path / "nope"), "", "train")
  with pytest.raises(tfds_builder.NoRecordsError, match=f"data directory {tmp_path}: no TFDS dataset"):
    tfds_builder.open_split(str(tmp_path), "", "train")
  with pytest.raises(tfds_builder.NoRecordsError, match="no TFDS dataset 'other'"):
    tfds_builder.open_split(str(out), "other", "train")
  with pytest.raises(tfds_builder.NoRecordsError, match="no split 'test'"):
    tfds_builder.open_split(str(out), "tiny_clips", "test")
  with pytest.raises(tfds_builder.NoRecordsError, match="dataset_dir"):
    tfds_builder.open_split("", "", "train")
  assert len(tfds_builder.open_split(str(out), "", "train")) == 9  # the only dataset: name not needed


def test_in_process_build_reuse_and_overwrite(corpus, tmp_path):
  root, _ = corpus
  kwargs = dict(jsonl=str(root / "train.jsonl"), media_root=str(root / "media"), data_dir=str(tmp_path),
                name="again")
  first = tfds_builder.build_dataset(**kwargs)
  assert first["train"]["written"] == 9 and first["train"]["skipped"]["missing_file"] == 1
  reused = tfds_builder.build_dataset(**kwargs)
  assert reused["train"] == {"written": 9, "skipped": {}, "skipped_examples": {}, "reused": True}
  (root / "media" / "missing.mp4").write_bytes(b"now here")
  try:
    rebuilt = tfds_builder.build_dataset(**kwargs, overwrite=True)
  finally:
    (root / "media" / "missing.mp4").unlink()
  assert rebuilt["train"]["skipped"] == {"bad_json": 2}
  assert list(tfds_builder.open_split(str(tmp_path), "again", "train")[1]["media"]) == [b"now here"]


def test_bad_builder_inputs(corpus, tmp_path):
  root, _ = corpus
  with pytest.raises(ValueError, match="snake_case"):
    tfds_builder.builder_class("MyData")
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  with pytest.raises(ValueError, match="has no samples"):
    tfds_builder.build_dataset(jsonl=str(empty), media_root=str(root), data_dir=str(tmp_path / "o"), name="e")
  proc = subprocess.run([sys.executable, "-m", "data_pipeline.build", "--jsonl", str(tmp_path / "none.jsonl"),
                         "--media-root", str(root), "--data-dir", str(tmp_path / "o"), "--name", "n", "--quiet"],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 2 and "none.jsonl does not exist" in proc.stderr


def test_parse_line_directly(tmp_path):
  (tmp_path / "v.mp4").write_bytes(b"vid")
  rec = tfds_builder.parse_line(json.dumps({"video": "v.mp4", "conversations": []}).encode(), "f:1", tmp_path)
  assert rec["error"] == "" and rec["id"] == "" and list(rec["media"]) == [b"vid"]
  rec = tfds_builder.parse_line(json.dumps({"image": [], "conversations": []}).encode(), "f:2", tmp_path)
  assert rec["modality"] == "image" and rec["error"] == "bad_json"  # an empty image list
  rec = tfds_builder.parse_line(json.dumps({"video": 3, "conversations": []}).encode(), "f:3", tmp_path)
  assert rec["error"] == "bad_json" and "non-empty strings" in rec["error_detail"]
  rec = tfds_builder.parse_line(json.dumps({"video": "v.mp4"}).encode(), "f:4", tmp_path)
  assert rec["error"] == "bad_json"
  assert np.asarray(rec["media"]).shape == (0,)
