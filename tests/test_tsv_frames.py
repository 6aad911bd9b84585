"""The reference's TSV frame stores: rows looked up by a sample's video name, sampled and timed as the reference's
`conversations` path does (uniform_sample over the 1-fps JPEG list, SPEC §1.1)."""

import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipeline import jsonl_samples, tfds_builder
from data_pipeline.errors import BadSampleError
from data_pipeline.loader import SampleProcessor, SampleSettings
from data_pipeline.media_files import MediaReader
from data_pipeline.tokenizer import build_tiny_tokenizer
from data_pipeline.tsv_frames import TsvStores, read_frame_list, uniform_sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS = (0, 60, 120, 180, 240)
CONV = [{"from": "human", "value": "<video>\nWhat is shown?"}, {"from": "gpt", "value": "grey"}]


def _jpeg(level: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((24, 40, 3), level, np.uint8)).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def _reference_timestamps(n, k, stored=None, start=None, end=None):
  """The reference's expression, written out: timestamps of the uniform_sample'd positions."""
  gap = n / k
  keep = sorted({int(i * gap + gap / 2) for i in range(k)})
  if stored:
    return [t for i, t in enumerate(stored) if i in keep]
  span = round((end if end is not None else n) - (start or 0))
  g = span / n
  grid = sorted({int(i * g + g / 2) for i in range(n)})
  return [round(float(t), 2) for i, t in enumerate(grid) if i in keep]


@pytest.fixture
def folder(tmp_path):
  """video_folder/ShareGPT4Video (with imgs.lineidx) and video_folder/VideoChat2IT/YouCook2 (without)."""
  rows = {"ShareGPT4Video": [("sharegpt4video/a.mp4", [_jpeg(v) for v in LEVELS]),
                             ("sharegpt4video/bad.mp4", None)],
          "VideoChat2IT/YouCook2": [("YouCook2/c.mp4", [_jpeg(v) for v in LEVELS[:3]])]}
  for sub, entries in rows.items():
    d = tmp_path / "video_folder" / sub
    d.mkdir(parents=True)
    lines, index = [], {}
    for i, (name, frames) in enumerate(entries):
      payload = json.dumps([base64.b64encode(f).decode() for f in frames]) if frames else '["%%%not base64"]'
      lines.append(f"{name}\t{payload}\n".encode())
      index[name] = i
    (d / "imgs.tsv").write_bytes(b"".join(lines))
    (d / "fname2idx.json").write_text(json.dumps(index))
    if sub == "ShareGPT4Video":
      offsets = np.cumsum([0] + [len(x) for x in lines[:-1]])
      (d / "imgs.lineidx").write_text("".join(f"{o}\n" for o in offsets))
  return tmp_path


def test_rows_are_found_in_every_store(folder):
  stores = TsvStores(str(folder / "video_folder"))
  assert stores.frames("sharegpt4video/a.mp4", 10**6) == [_jpeg(v) for v in LEVELS]
  assert stores.frames("YouCook2/c.mp4", 10**6) == [_jpeg(v) for v in LEVELS[:3]]
  assert stores.frames("plain.mp4", 10**6) is None


def test_parse_line_makes_frames_records(folder):
  stores = TsvStores(str(folder / "video_folder"))
  media = folder / "media"
  media.mkdir()
  line = json.dumps({"id": "s", "video_id": "sharegpt4video/a.mp4", "timestamps": [0.5, 1.5, 2.5, 3.5, 4.5],
                     "conversations": CONV}).encode()
  rec = jsonl_samples.parse_line(line, "t:1", MediaReader(media), stores)
  assert (rec["error"], rec["modality"]) == ("", "frames") and len(rec["media"]) == 5
  assert rec["timestamps"].tolist() == [0.5, 1.5, 2.5, 3.5, 4.5]
  rec = jsonl_samples.parse_line(line.replace(b"a.mp4", b"bad.mp4"), "t:2", MediaReader(media), stores)
  assert rec["error"] == "bad_tsv" and "base64" in rec["error_detail"]
  rec = jsonl_samples.parse_line(line.replace(b"sharegpt4video/a.mp4", b"v.mp4"), "t:3", MediaReader(media), stores)
  assert rec["error"] == "missing_file"  # not in a store: read as a file under the media root


@pytest.mark.parametrize("k,stored,start,end", [(3, None, None, None), (5, None, None, None),
                                                (3, [0.5, 1.5, 2.5, 3.5, 4.5], None, None),
                                                (3, None, 10.0, 20.0), (2, None, 1.0, None)])
def test_sampling_and_timestamps_follow_the_reference(folder, k, stored, start, end):
  blobs = TsvStores(str(folder / "video_folder")).frames("sharegpt4video/a.mp4", 10**6)
  clip = read_frame_list(blobs, num_frames=k, image_size=16, stored_timestamps=stored, start_sec=start,
                         end_sec=end)
  assert clip.indices == uniform_sample(5, k)
  assert clip.timestamps == _reference_timestamps(5, k, stored, start, end)
  assert clip.frames.shape == (len(clip.indices), 16, 16, 3)
  np.testing.assert_allclose(clip.frames.mean(axis=(1, 2, 3)), [LEVELS[i] for i in clip.indices], atol=3)


def test_too_few_frames_and_too_few_timestamps(folder):
  blobs = TsvStores(str(folder / "video_folder")).frames("sharegpt4video/a.mp4", 10**6)
  assert len(_reference_timestamps(5, 2, start=3.0)) == 1  # a 2 s clip of 5 frames: the reference mismatches
  with pytest.raises(BadSampleError, match="1 timestamps for 2 sampled frames"):
    read_frame_list(blobs, num_frames=2, image_size=16, start_sec=3.0)
  with pytest.raises(BadSampleError) as e:
    read_frame_list(blobs[:1], num_frames=420, image_size=16)
  assert e.value.reason == "too_few_frames"


def test_loader_turns_a_frames_record_into_a_video_sample(folder, tmp_path):
  stores = TsvStores(str(folder / "video_folder"))
  media = tmp_path / "m"
  media.mkdir()
  line = json.dumps({"video": "YouCook2/c.mp4", "conversations": CONV}).encode()
  rec = jsonl_samples.parse_line(line, "t:1", MediaReader(media), stores)
  tok = build_tiny_tokenizer(["What is shown? grey 0.0 1.0 2.0"], tmp_path / "tok.json", template="qwen2",
                             vocab_size=300)
  settings = SampleSettings(image_size=16, max_frames=420, fps=1.0, template="qwen2", tokenizer_path=tok,
                            max_text_len=512, max_images=8, max_bucket=16, normalize_on_host=False)
  sample = SampleProcessor([rec], settings).process(rec)
  assert sample["frames"].shape == (3, 16, 16, 3)
  assert sample["timestamps"].tolist() == [0.0, 1.0, 2.0]
  assert int((sample["input_ids"] == -200).sum()) == 4  # thumbnail + 3 frames


def test_cli_reads_the_tsv_folder(folder, tmp_path):
  media = tmp_path / "media"
  media.mkdir()
  lines = [json.dumps({"id": "a", "video": "sharegpt4video/a.mp4", "conversations": CONV}),
           json.dumps({"id": "b", "video": "sharegpt4video/bad.mp4", "conversations": CONV})]
  (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
  cmd = [sys.executable, "-m", "data_pipeline.build", "--jsonl", str(tmp_path / "t.jsonl"), "--media-root",
         str(media), "--data-dir", str(tmp_path / "out"), "--name", "tsv", "--quiet", "--video-tsv-folder",
         str(folder / "video_folder")]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=240)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout)["splits"]["train"]["skipped"] == {"bad_tsv": 1}
  record = tfds_builder.open_split(str(tmp_path / "out"), "tsv", "train")[0]
  assert record["modality"] == b"frames" and list(record["media"]) == [_jpeg(v) for v in LEVELS]
