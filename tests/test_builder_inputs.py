"""The builder on hostile and reference-format input: every bad line is a skipped record with a reason, every
good sample survives, only regular files inside the media root are read, and the reference's keys are read."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import jsonl_samples, tfds_builder
from data_pipeline.media_files import MediaReader, MediaRefused, escape
from videos import write_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONV = [{"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "ok"}]


@contextlib.contextmanager
def deadline(seconds: int):
  """Fails the test instead of hanging it (a blocking open of a FIFO is interrupted by the alarm)."""
  def _raise(*_):
    raise TimeoutError(f"still blocked after {seconds} s")
  old = signal.signal(signal.SIGALRM, _raise)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _line(**sample) -> bytes:
  sample.setdefault("conversations", CONV)
  return json.dumps(sample).encode()


@pytest.fixture
def tree(tmp_path):
  """media/ with a real video, a FIFO, a symlink loop, symlinks out of the root; a secret file beside it."""
  media = tmp_path / "media"
  (media / "sub").mkdir(parents=True)
  good = write_video(media / "sub" / "good.mp4", num_frames=30, rate=30)
  (tmp_path / "secret.txt").write_bytes(b"TOKEN=hunter2")
  os.mkfifo(media / "pipe.mp4")
  os.symlink("loop_b.mp4", media / "loop_a.mp4")
  os.symlink("loop_a.mp4", media / "loop_b.mp4")
  os.symlink(tmp_path / "secret.txt", media / "escape.mp4")
  os.symlink("/dev/zero", media / "zero.mp4")
  os.symlink("sub/good.mp4", media / "inner_link.mp4")
  (media / "dir.mp4").mkdir()
  return tmp_path, media, open(good, "rb").read()


def _parse(raw: bytes, media, **kwargs) -> dict:
  with deadline(20):
    return jsonl_samples.parse_line(raw, "t.jsonl:1", MediaReader(media, **kwargs))


@pytest.mark.parametrize("rel,reason", [
    ("pipe.mp4", "not_regular_file"),
    ("dir.mp4", "not_regular_file"),
    ("loop_a.mp4", "symlink_loop"),
    ("escape.mp4", "outside_media_root"),
    ("zero.mp4", "outside_media_root"),
    ("../secret.txt", "outside_media_root"),
    ("sub/../../secret.txt", "outside_media_root"),
    ("/proc/self/environ", "outside_media_root"),
    ("/dev/zero", "outside_media_root"),
    ("nope/missing.mp4", "missing_file"),
    ("sub/good.mp4/x", "missing_file"),
    ("a\x00b.mp4", "bad_path"),
])
def test_refused_media_are_skipped_with_a_reason(tree, rel, reason):
  _, media, _ = tree
  rec = _parse(_line(id="s1", video=rel), media)
  assert rec["error"] == reason, rec["error_detail"]
  assert rec["modality"] == "video" and len(rec["media"]) == 0 and rec["id"] == "s1"
  rec["error_detail"].encode("utf-8")
  assert "hunter2" not in rec["error_detail"]


@pytest.mark.parametrize("rel,reason", [
    ("pipe.mp4", "not_regular_file"), ("zero.mp4", "not_regular_file"), ("/dev/zero", "not_regular_file"),
    ("/proc/self/environ", "not_regular_file"), ("/proc/self/status", "not_regular_file"),
    ("/sys/kernel/mm/transparent_hugepage/enabled", "not_regular_file"), ("loop_b.mp4", "symlink_loop"),
])
def test_outside_allowed_still_reads_only_regular_files(tree, rel, reason):
  _, media, _ = tree
  if rel.startswith("/sys") and not os.path.exists(rel):
    rel = "/proc/self/stat"
  rec = _parse(_line(video=rel), media, allow_outside=True)
  assert rec["error"] == reason, rec["error_detail"]
  assert len(rec["media"]) == 0


def test_allowed_paths_and_the_size_bound(tree):
  tmp, media, good = tree
  for rel in ("sub/good.mp4", "inner_link.mp4", "./sub/../sub/good.mp4", str(media / "sub" / "good.mp4")):
    rec = _parse(_line(video=rel), media)
    assert rec["error"] == "" and list(rec["media"]) == [good], rel
  rec = _parse(_line(video="escape.mp4"), media, allow_outside=True)
  assert rec["error"] == "" and list(rec["media"]) == [b"TOKEN=hunter2"]
  rec = _parse(_line(video="../secret.txt"), media, allow_outside=True)
  assert rec["error"] == "" and list(rec["media"]) == [b"TOKEN=hunter2"]
  rec = _parse(_line(video="sub/good.mp4"), media, max_bytes=len(good) - 1)
  assert rec["error"] == "file_too_large" and str(len(good)) in rec["error_detail"]
  assert _parse(_line(video="sub/good.mp4"), media, max_bytes=len(good))["error"] == ""
  os.symlink(media, tmp / "media_link")  # a symlinked root: absolute paths through the link name are inside
  rec = _parse(_line(video=str(tmp / "media_link" / "sub" / "good.mp4")), tmp / "media_link")
  assert rec["error"] == "" and list(rec["media"]) == [good]
  with pytest.raises(ValueError, match="2 GiB"):
    MediaReader(media, max_bytes=2**31)
  assert os.stat(media).st_dev not in MediaReader(media)._pseudo
  assert os.stat("/").st_dev not in MediaReader("/")._pseudo


def test_a_fifo_swapped_in_after_stat_does_not_block(tree):
  """The open is non-blocking and re-checked with fstat, so a file replaced by a FIFO is refused, not waited on."""
  _, media, _ = tree
  reader = MediaReader(media)
  real = os.path.realpath(os.fsencode(media / "pipe.mp4"))
  regular = os.stat(media / "sub" / "good.mp4")
  with deadline(20), pytest.raises(MediaRefused, match="changed while being opened"):
    reader._read_checked(real, regular, "pipe.mp4")


def test_non_utf8_id_and_path_are_skipped_and_escaped(tree):
  _, media, _ = tree
  rec = _parse(b'{"id": "clip\xff\xfe7", "video": "sub/good.mp4", "conversations": []}', media)
  assert rec["error"] == "bad_id" and rec["id"] == "clip\\xff\\xfe7" and len(rec["media"]) == 0
  rec = _parse(b'{"id": "m1", "video": "caf\xe9/missing.mp4", "conversations": []}', media)
  assert rec["error"] == "missing_file" and "caf\\xe9/missing.mp4" in rec["error_detail"]
  assert list(rec["media_path"]) == [b"caf\\xe9/missing.mp4"]
  rec = _parse(_line(id="m2", video="bad\udc80\ud800.mp4"), media)  # JSON \u escapes of lone surrogates
  assert rec["error"] == "bad_path" and rec["error_detail"].encode("utf-8")


def test_reference_keys_are_read(tree):
  _, media, good = tree
  rec = _parse(_line(id=7, video_id="sub/good.mp4", start_sec=1.5, end_sec=4), media)
  assert (rec["error"], rec["modality"], rec["id"]) == ("", "video", "7") and list(rec["media"]) == [good]
  assert (rec["start"], rec["end"]) == (1.5, 4.0)
  rec = _parse(_line(video="sub/good.mp4", video_id="other.mp4", start=2, start_sec=2.0), media)
  assert rec["error"] == "" and rec["start"] == 2.0 and math.isnan(rec["end"])  # `video` wins, as in the reference
  rec = _parse(_line(video_id="sub/good.mp4", data_type="conversations", timestamps=[0.5], video_len=1,
                     metadata={"q": 1}), media)
  assert rec["error"] == ""


@pytest.mark.parametrize("sample,reason,needle", [
    (dict(video_path="sub/good.mp4"), "unknown_media_key", "video_path"),
    (dict(frames=["a.jpg", "b.jpg"]), "unknown_media_key", "frames"),
    (dict(source="sub/good.mp4"), "unknown_media_key", "source"),
    (dict(data_type="caption", video="sub/good.mp4", caption="a cat"), "unsupported_data_type", "caption"),
    (dict(video="sub/good.mp4", start_sec="1.5"), "bad_clip", "start_sec"),
    (dict(video="sub/good.mp4", start_sec=float("nan")), "bad_clip", "start_sec"),
    (dict(video="sub/good.mp4", start_sec=1, start=2), "bad_clip", "disagree"),
    (dict(video="sub/good.mp4", start_sec=5, end_sec=2), "bad_clip", "before"),
    (dict(video="sub/good.mp4", image="x.jpg"), "bad_json", "both"),
    (dict(image=["x.jpg", None]), "bad_json", "non-empty strings"),
])
def test_unusable_keys_are_errors_not_text_samples(tree, sample, reason, needle):
  _, media, _ = tree
  rec = _parse(_line(**sample), media)
  assert rec["error"] == reason and needle in rec["error_detail"], rec["error_detail"]


def test_text_only_lines_stay_text(tree):
  _, media, _ = tree
  rec = _parse(_line(id="t", source_dataset="llava", split="train", note="see frame 3"), media)
  assert (rec["error"], rec["modality"]) == ("", "text")


def test_json_that_python_refuses_is_bad_json(tree):
  _, media, _ = tree
  for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"id": ' + b"9" * 5000 + b', "conversations": []}'):
    assert _parse(raw, media)["error"] == "bad_json"


def test_build_keeps_every_good_sample(tree):
  """Through the CLI: loop, non-UTF-8 id, non-UTF-8 missing path, FIFO, /proc, an overlong line -- all skipped,
  counted and named in the report; the good samples are written. (Before: a traceback, or a hang on the FIFO.)"""
  tmp, media, good = tree
  lines = [
      _line(id="g1", video="sub/good.mp4", start_sec=0.5, end_sec=1.0),
      _line(id="loop", video="loop_a.mp4"),
      b'{"id": "bad\xffid", "video": "sub/good.mp4", "conversations": []}',
      b'{"id": "p1", "video": "gone\xfe.mp4", "conversations": []}',
      _line(id="fifo", video="pipe.mp4"),
      _line(id="env", video="/proc/self/environ"),
      _line(id="g2", video_id="inner_link.mp4"),
      _line(id="key", video_path="sub/good.mp4"),
  ]
  (tmp / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  out = tmp / "tfds"
  cmd = [sys.executable, "-m", "data_pipeline.build", "--jsonl", str(tmp / "train.jsonl"), "--media-root",
         str(media), "--data-dir", str(out), "--name", "hostile", "--quiet"]
  proc = subprocess.run(cmd, capture_output=True, cwd=REPO, timeout=240)
  assert proc.returncode == 0, proc.stderr.decode(errors="replace")
  report = json.loads(proc.stdout)["splits"]["train"]
  assert report["written"] == 8
  assert report["skipped"] == {"symlink_loop": 1, "bad_id": 1, "missing_file": 1, "not_regular_file": 1,
                               "outside_media_root": 1, "unknown_media_key": 1}
  assert report["skipped_examples"]["bad_id"][0].startswith("train.jsonl:3 (id='bad\\\\xffid')")
  assert "gone\\xfe.mp4" in report["skipped_examples"]["missing_file"][0]
  assert b"Traceback" not in proc.stderr
  source = tfds_builder.open_split(str(out), "hostile", "train")
  records = [source[i] for i in range(len(source))]
  kept = [r for r in records if not r["error"]]
  assert [r["id"] for r in kept] == [b"g1", b"g2"]
  assert all(list(r["media"]) == [good] for r in kept)
  assert (float(kept[0]["start"]), float(kept[0]["end"])) == (0.5, 1.0)
  assert not any(b"hunter2" in b"".join(np.asarray(r["media"]).tolist() or [b""]) for r in records)


def test_bom_crlf_overlong_line_and_non_regular_jsonl(tree, monkeypatch):
  tmp, media, _ = tree
  monkeypatch.setattr(jsonl_samples, "MAX_LINE_BYTES", 1000)
  path = tmp / "long.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join([_line(id="a", video="sub/good.mp4"), b'{"id": "' + b"x" * 5000 + b'"}',
                               _line(id="b", video="sub/good.mp4")]) + b"\n")
  records = list(jsonl_samples.read_jsonl(path, MediaReader(media)))
  assert [(n, r["id"], r["error"]) for n, r in records] == [(1, "a", ""), (2, "", "bad_json"), (3, "b", "")]
  assert jsonl_samples.count_lines(path) == 3
  with deadline(20), pytest.raises(ValueError, match="not a regular file"):
    jsonl_samples.count_lines(media / "pipe.mp4")


def test_escape_gives_valid_utf8():
  assert escape("a\udcffb") == "a\\xffb" and escape(b"\xfe") == "\\xfe" and escape("\ud800") == "\\ud800"
  assert escape("caf\u00e9") == "caf\u00e9"


def test_remote_media_root_checks(tmp_path, monkeypatch):
  """gs:// roots (read through epath): lexical containment and the size bound; here epath maps to local files."""
  from data_pipeline import media_files
  (tmp_path / "media").mkdir()
  (tmp_path / "media" / "a.mp4").write_bytes(b"x" * 10)

  class LocalPath:
    def __init__(self, uri):
      self.local = tmp_path / uri.split("gs://bucket/", 1)[1]

    def stat(self):
      return type("Stat", (), {"length": self.local.stat().st_size})

    def open(self, mode):
      return open(self.local, mode)

  monkeypatch.setattr(media_files.epath, "Path", LocalPath)
  reader = MediaReader("gs://bucket/media", max_bytes=10)
  assert reader.read("a.mp4") == b"x" * 10
  for rel, reason in (("../secret", "outside_media_root"), ("gs://bucket/other/a.mp4", "outside_media_root"),
                      ("b.mp4", "missing_file")):
    with pytest.raises(MediaRefused) as e:
      reader.read(rel)
    assert e.value.reason == reason
  with pytest.raises(MediaRefused, match="more than the maximum 9"):
    MediaReader("gs://bucket/media", max_bytes=9).read("a.mp4")
