"""The Grain loader: contract shapes, exact resume (0 and 2 workers), process shards, skip counting."""

import collections
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs.quicksviewer import get_config
from data_pipeline import collate, loader, stats, tfds_builder
from data_pipeline.errors import BadSampleError
from data_pipeline.image import read_image_crops
from data_pipeline.prompt import tokenize_sample
from data_pipeline.tokenizer import build_tiny_tokenizer, load_tokenizer, pad_token_id
from data_pipeline.video import read_video
from qv_jax.batch import BATCH_KEYS, IGNORE_INDEX, IMAGE_TOKEN_INDEX, MODALITY_IMAGE, MODALITY_VIDEO, batch_shapes
from qv_jax.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import videos  # noqa: E402  (the decode engineer's PyAV test-video helpers)


def _conv(question, answer):
  return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


GOOD_VIDEO_SECONDS = (2, 3, 4, 5, 6, 7, 3, 5)
BAD = ("truncated.mp4", "corrupt.mp4", "zero.mp4", "audio_only.m4a", "unsupported.avi")  # tests/videos.py kinds


def _write_broken(media, name, tmp_dir):
  if name == "truncated.mp4":
    videos.write_truncated(media / "good7.mp4", media / name, keep=0.4)
  elif name == "corrupt.mp4":
    videos.write_garbage(media / name)
  elif name == "zero.mp4":
    videos.write_empty(media / name)
  elif name == "audio_only.m4a":
    videos.write_audio_only(media / name)
  else:
    videos.write_unsupported_codec(media / name, tmp_dir)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Media, jsonl, a built TFDS dataset and a tiny tokenizer; `expected` maps record index -> what it is."""
  root = tmp_path_factory.mktemp("loader")
  media = root / "media"
  media.mkdir()
  samples, expected = [], {}

  def add(sample, kind):
    expected[len(samples)] = kind
    samples.append(sample)

  for i, seconds in enumerate(GOOD_VIDEO_SECONDS):
    videos.write_video(media / f"good{i}.mp4", num_frames=4 * seconds, rate=4, width=64, height=36)
    add({"id": f"v{i}", "video": f"good{i}.mp4", "conversations": _conv("<image>\nWhat is shown?", f"clip {i}")},
        "video")
  from PIL import Image
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), np.uint8)).save(media / "pic.png")
  add({"id": "img", "image": "pic.png", "conversations": _conv("<image>\nDescribe.", "noise")}, "image")
  add({"id": "txt", "conversations": _conv("Say hi.", "hi")}, "text")
  for name in BAD:
    _write_broken(media, name, root)
    add({"id": name, "video": name, "conversations": _conv("<image>\nq", "a")}, f"bad:{name}")
  add({"id": "gone", "video": "missing.mp4", "conversations": _conv("<image>\nq", "a")}, "bad:missing")
  add({"id": "empty_conv", "video": "good0.mp4", "conversations": []}, "bad:empty_conversation")
  lines = [json.dumps(s).encode() for s in samples]
  expected[len(lines)] = "bad:non_utf8"
  lines.append(b'{"id": "latin1", "video": "good1.mp4", "conversations": [{"from": "human", "value": '
               b'"<image>\\nd\xe9j\xe0 vu"}, {"from": "gpt", "value": "x"}]}')
  (root / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  assert len(lines) % 2 == 0 and sum(k in ("video", "image", "text") for k in expected.values()) % 2 == 0
  data_dir = root / "tfds"
  tfds_builder.build_dataset(jsonl=str(root / "train.jsonl"), media_root=str(media), data_dir=str(data_dir),
                             name="clips")
  texts = [json.dumps(s["conversations"]) for s in samples] + ["0123456789 .<image> What is shown? clip hi"]
  tokenizer_path = build_tiny_tokenizer(texts, str(root / "tokenizer.json"), template="qwen2")
  return dict(root=root, media=media, data_dir=data_dir, tokenizer=tokenizer_path, expected=expected,
              samples=samples)


def _config(world, **data):
  config = get_config("size=tiny")
  config.data.dataset_dir = str(world["data_dir"])
  config.data.dataset_name = "clips"
  config.data.tokenizer_path = world["tokenizer"]
  config.data.batch_size = 2
  config.data.num_workers = 0
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


def _good(world):
  return sorted(i for i, k in world["expected"].items() if not k.startswith("bad:"))


def _bad(world):
  return sorted(i for i, k in world["expected"].items() if k.startswith("bad:"))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y) == set(BATCH_KEYS)
    for key in BATCH_KEYS:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _reference_row(world, config, index):
  """What the loader must produce for record `index`, computed directly from the decode/prompt functions."""
  d = config.data
  sample = world["samples"][index]
  tok = load_tokenizer(d.tokenizer_path, d.template)
  if "video" in sample:
    clip = read_video(str(world["media"] / sample["video"]), num_frames=d.max_frames, fps=d.fps,
                      image_size=d.image_size)
    frames, timestamps, modality = clip.frames, list(clip.timestamps), MODALITY_VIDEO
    tokens = tokenize_sample(sample["conversations"], modality="video", tokenizer=tok, template=d.template,
                             timestamps=timestamps)
  elif "image" in sample:
    frames = read_image_crops(str(world["media"] / sample["image"]), image_size=d.image_size,
                              pinpoints=loader.image_pinpoints(d.image_size))
    timestamps, modality = [0.0] * len(frames), MODALITY_IMAGE
    tokens = tokenize_sample(sample["conversations"], modality="image", tokenizer=tok, template=d.template,
                             crops_per_image=[len(frames)])
  else:
    frames = np.full((1, d.image_size, d.image_size, 3), 128, np.uint8)  # mid-grey: 0 after normalisation
    timestamps, modality = [0.0], MODALITY_IMAGE
    tokens = tokenize_sample(sample["conversations"], modality="text", tokenizer=tok, template=d.template)
  return frames, np.asarray(timestamps, np.float32), modality, tokens, pad_token_id(tok)


def test_one_epoch_matches_contract_reference_and_counts_skips(world, caplog):
  config = _config(world)
  data = loader.make_dataset(config, num_epochs=1, seed=7)
  caplog.set_level(logging.INFO)
  it = iter(data)
  batches = list(it)
  assert len(batches) == len(_good(world)) // 2
  rows = {}
  for batch in batches:
    assert tuple(batch) == BATCH_KEYS
    bucket = batch["frames"].shape[1]
    want = batch_shapes(config, 2, bucket)
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == want
    for r in range(2):
      rows[int(batch["sample_id"][r])] = {k: v[r] for k, v in batch.items()}
  assert sorted(rows) == _good(world)
  for index, row in rows.items():
    frames, timestamps, modality, tokens, pad_id = _reference_row(world, config, index)
    n, t = len(frames), len(tokens["input_ids"])
    assert row["num_frames"] == n and row["modality"] == modality
    np.testing.assert_array_equal(row["frames"][:n], frames)
    assert not row["frames"][n:].any()
    np.testing.assert_array_equal(row["timestamps"][:n], timestamps)
    assert not row["timestamps"][n:].any()
    for key, pad in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("token_frame", -1)):
      np.testing.assert_array_equal(row[key][:t], tokens[key])
      assert (row[key][t:] == pad).all(), key
    assert row["token_valid"][:t].all() and not row["token_valid"][t:].any()
    placeholders = int((row["input_ids"] == IMAGE_TOKEN_INDEX).sum())
    assert placeholders == (n + 1 if modality == MODALITY_VIDEO else n)
  if any(k == "video" for k in world["expected"].values()):
    assert any(row["modality"] == MODALITY_VIDEO and row["timestamps"][0] == 0.5 for row in rows.values())

  # Every bad record: skipped once, with a logged reason naming its line and file, counted by reason.
  reasons = {}
  for index in _bad(world):
    sample_line = f"train.jsonl:{index + 1}"
    logged = [r.getMessage() for r in caplog.records if f"skipped sample {index} " in r.getMessage()]
    assert len(logged) == 1 and sample_line in logged[0], (index, logged)
    reasons[index] = logged[0].split("(", 1)[1].split(")", 1)[0]
  kinds = {world["expected"][i]: reasons[i] for i in reasons}
  assert kinds["bad:missing"] == "missing_file"
  assert kinds["bad:empty_conversation"] == "bad_text"
  assert kinds["bad:non_utf8"] == "bad_text"
  assert kinds["bad:zero.mp4"] == "empty_file"
  assert kinds["bad:audio_only.m4a"] == "no_video_stream"
  assert kinds["bad:unsupported.avi"] == "unsupported_codec"
  assert kinds["bad:corrupt.mp4"] in ("corrupt", "zero_frames")
  assert kinds["bad:truncated.mp4"] in ("corrupt", "zero_frames", "too_few_frames")
  for name in ("truncated.mp4", "corrupt.mp4", "zero.mp4", "audio_only.m4a", "unsupported.avi", "missing.mp4"):
    index = next(i for i, s in enumerate(world["samples"]) if s.get("video") == name)
    assert any(name in r.getMessage() for r in caplog.records if f"skipped sample {index} " in r.getMessage())
  by_reason = {}
  for reason in reasons.values():
    by_reason[reason] = by_reason.get(reason, 0) + 1
  metrics = it.loader_stats()
  assert metrics["skipped/total"] == len(_bad(world)) and metrics["samples"] == len(_good(world))
  assert {k[len("skipped/"):]: v for k, v in metrics.items() if k.startswith("skipped/") and k != "skipped/total"} \
      == by_reason
  assert metrics["epochs_completed"] == 1
  assert it.epoch_reports == [{"epoch": 0, "samples": len(_good(world)), "skipped": len(_bad(world)),
                               "by_reason": by_reason}]
  end = [r.getMessage() for r in caplog.records if "end of epoch 0" in r.getMessage()]
  assert len(end) == 1 and f"{len(_bad(world))} skipped" in end[0] and "missing_file=1" in end[0]


def _restore_roundtrip(world, num_workers, before, after):
  config = _config(world, num_workers=num_workers)
  data = loader.make_dataset(config, seed=3)  # repeats forever; `before + after` batches cross an epoch
  it = iter(data)
  try:
    _take(it, before)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, after)
    expected_stats = it.loader_stats()
  finally:
    it.close()
  fresh = iter(loader.make_dataset(config, seed=3))
  try:
    fresh.set_state(state)
    got = _take(fresh, after)
    assert fresh.loader_stats() == expected_stats
  finally:
    fresh.close()
  _assert_batches_equal(got, expected)
  return expected, expected_stats


def test_restore_reproduces_next_batches_no_workers(world):
  per_epoch = len(_good(world)) // 2
  batches, metrics = _restore_roundtrip(world, 0, before=per_epoch - 2, after=4)
  assert metrics["epochs_completed"] >= 1  # the restored part crossed into epoch 1
  ids = np.concatenate([b["sample_id"] for b in batches])
  assert set(ids) <= set(_good(world))


def test_restore_reproduces_next_batches_two_workers(world):
  per_epoch = len(_good(world)) // 2
  batches, metrics = _restore_roundtrip(world, 2, before=per_epoch - 1, after=4)
  assert metrics["skipped/total"] >= len(_bad(world))  # worker counts reached the main process
  assert metrics["epochs_completed"] >= 1


def test_grain_orbax_checkpoint_handler_saves_and_restores_the_iterator(world, tmp_path):
  import grain
  from etils import epath
  config = _config(world)
  it = iter(loader.make_dataset(config, seed=9))
  _take(it, 3)
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
  expected = _take(it, 3)
  fresh = grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), item=iter(loader.make_dataset(config,
                                                                                                         seed=9)))
  _assert_batches_equal(_take(fresh, 3), expected)
  assert fresh.loader_stats() == it.loader_stats()


def test_record_order_permutes_each_epoch_and_shards_evenly():
  def order(process_index, process_count, records=10, epochs=3):
    ds = loader.record_order(records, seed=4, process_index=process_index, process_count=process_count,
                             num_epochs=epochs)
    return [ds[i] for i in range(len(ds))]
  single = order(0, 1)
  epochs = [[i for i, e in single if e == k] for k in range(3)]
  assert all(sorted(e) == list(range(10)) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
  assert [e for _, e in single] == sorted(e for _, e in single)
  shards = [order(p, 3) for p in range(3)]
  assert [len(s) for s in shards] == [9, 9, 9]  # 10 records, 3 processes: 3 each per epoch, 1 left out
  for k in range(3):
    per_epoch = [[i for i, e in s if e == k] for s in shards]
    flat = sum(per_epoch, [])
    assert len(set(flat)) == 9  # disjoint
    assert set(flat) == set(epochs[k][:9])  # the same permutation, cut the same way in every process
  assert [i for i, _ in order(0, 1, epochs=1)] == [i for i, _ in order(0, 1, epochs=1)]  # deterministic
  unshuffled = loader.record_order(5, seed=0, process_index=1, process_count=2, num_epochs=1, shuffle=False)
  assert [unshuffled[i] for i in range(len(unshuffled))] == [(1, 0), (3, 0)]


def test_two_workers_deliver_each_good_sample_once_per_epoch(world):
  config = _config(world, num_workers=2)
  it = iter(loader.make_dataset(config, num_epochs=2, seed=5))
  try:
    batches = list(it)
  finally:
    it.close()
  ids = collections.Counter(int(i) for b in batches for i in b["sample_id"])
  # Each worker batches its own slice, so at the very end of a finite stream each may drop a partial batch.
  assert set(ids) == set(_good(world)) and max(ids.values()) == 2
  assert 2 * len(_good(world)) - sum(ids.values()) <= 2 * (2 - 1)
  metrics = it.loader_stats()
  assert metrics["skipped/total"] == 2 * len(_bad(world)) and metrics["epochs_completed"] == 2
  assert [r["skipped"] for r in it.epoch_reports] == [len(_bad(world))] * 2


_SHARD_SCRIPT = textwrap.dedent("""
  import json, sys
  sys.path.insert(0, {tests!r})
  from test_loader import _config
  from data_pipeline import loader
  world = {{"data_dir": {data_dir!r}, "tokenizer": {tokenizer!r}}}
  it = iter(loader.make_dataset(_config(world), process_index=int(sys.argv[1]), process_count=2,
                                num_epochs=1, seed=11))
  ids = [int(i) for b in it for i in b["sample_id"]]
  print(json.dumps({{"ids": ids, "stats": it.loader_stats()}}))
""")


def test_two_processes_read_disjoint_shards_covering_the_data(world):
  script = _SHARD_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), data_dir=str(world["data_dir"]),
                                tokenizer=world["tokenizer"])
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=env) for i in range(2)]
  outs = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  a, b = (set(o["ids"]) for o in outs)
  assert a and b and not a & b
  assert a | b == set(_good(world))
  skipped = [o["stats"]["skipped/total"] for o in outs]
  assert sum(skipped) == len(_bad(world))
  records = len(world["expected"])
  assert [len(o["ids"]) + s for o, s in zip(outs, skipped)] == [records // 2] * 2  # equal shards


def test_frame_buckets_pad_each_batch_to_its_largest_sample(world):
  config = _config(world, frame_buckets=(4, 8, 16))
  batches = list(loader.make_dataset(config, num_epochs=1, seed=1))
  seen = set()
  for batch in batches:
    bucket = batch["frames"].shape[1]
    assert bucket == collate.pick_bucket(int(batch["num_frames"].max()), (4, 8, 16))
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == batch_shapes(config, 2, bucket)
    seen.add(bucket)
  assert seen >= {8}


def test_normalize_on_host_gives_float_frames(world):
  config = _config(world, normalize_on_host=True)
  batch = next(iter(loader.make_dataset(config, num_epochs=1, seed=2)))
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == batch_shapes(config, 2, 16)
  n = int(batch["num_frames"][0])
  assert batch["frames"].min() >= -1.0 and batch["frames"].max() <= 1.0
  assert np.abs(batch["frames"][0, :n]).sum() > 0


def test_errors_before_any_work(world, tmp_path):
  with pytest.raises(loader.NoRecordsError, match=str(tmp_path)):
    loader.make_dataset(_config(world, dataset_dir=str(tmp_path), dataset_name=""))
  with pytest.raises(loader.NoRecordsError, match="no split 'validation'"):
    loader.make_dataset(_config(world), split="validation")
  with pytest.raises(ConfigError, match="data.batch_size"):
    loader.make_dataset(_config(world, batch_size=3), process_index=0, process_count=2)
  with pytest.raises(ConfigError, match="data.tokenizer_path"):
    loader.make_dataset(_config(world, tokenizer_path=str(tmp_path / "none.json")))


def test_a_dataset_of_only_bad_records_fails_loudly(world, tmp_path):
  lines = [json.dumps({"id": f"b{i}", "video": f"missing{i}.mp4", "conversations": _conv("<image>", "a")})
           for i in range(3)]
  (tmp_path / "bad.jsonl").write_text("\n".join(lines))
  tfds_builder.build_dataset(jsonl=str(tmp_path / "bad.jsonl"), media_root=str(tmp_path), data_dir=str(tmp_path),
                             name="bad")
  config = _config(world, dataset_dir=str(tmp_path), dataset_name="bad")
  assert list(loader.make_dataset(config, num_epochs=1)) == []  # a finite stream just ends, counted
  with pytest.raises(collate.NoUsableSamplesError, match="records in a row were bad"):
    next(iter(loader.make_dataset(config)))


# ---- units -------------------------------------------------------------------------------------------------


def test_pick_bucket():
  assert collate.pick_bucket(1, (4, 8)) == 4 and collate.pick_bucket(4, (4, 8)) == 4
  assert collate.pick_bucket(5, (4, 8)) == 8
  with pytest.raises(ValueError, match="frame_buckets"):
    collate.pick_bucket(9, (4, 8))


def test_fit_text_truncates_only_past_the_visual_tokens():
  ids = np.array([5, IMAGE_TOKEN_INDEX, 7, 8, 9, 10], np.int32)
  tokens = {"input_ids": ids, "labels": np.array([-100, -100, 7, 8, 9, 10], np.int32),
            "token_frame": np.array([-1, -1, -1, -1, -1, -1], np.int32)}
  out = loader.fit_text(tokens, 4)
  assert out["truncated"] and list(out["input_ids"]) == [5, IMAGE_TOKEN_INDEX, 7, 8]
  assert list(out["labels"]) == [-100, -100, 7, 8]
  assert not loader.fit_text(tokens, 6)["truncated"]
  with pytest.raises(BadSampleError) as e:
    loader.fit_text(tokens, 1)
  assert e.value.reason == "text_too_long"
  tokens["token_frame"] = np.array([-1, -1, 0, 0, -1, -1], np.int32)
  with pytest.raises(BadSampleError):
    loader.fit_text(tokens, 3)


def test_collator_pads_to_contract():
  col = collate.Collator(image_size=4, max_text_len=6, frame_buckets=(2, 3), pad_id=9, normalize_on_host=False)
  samples = [
      dict(frames=np.ones((2, 4, 4, 3), np.uint8), timestamps=np.array([0.5, 1.5], np.float32), modality=1,
           input_ids=np.array([1, -200, 2], np.int32), labels=np.array([-100, -100, 2], np.int32),
           token_frame=np.array([-1, 0, -1], np.int32), sample_id=12),
      dict(frames=np.full((3, 4, 4, 3), 2, np.uint8), timestamps=np.zeros(3, np.float32), modality=0,
           input_ids=np.array([3], np.int32), labels=np.array([3], np.int32),
           token_frame=np.array([-1], np.int32), sample_id=4),
  ]
  batch = col(samples)
  assert batch["frames"].shape == (2, 3, 4, 4, 3)
  assert batch["frames"][0, 2].max() == 0 and batch["frames"][1, 2].min() == 2
  assert batch["input_ids"].tolist() == [[1, -200, 2, 9, 9, 9], [3, 9, 9, 9, 9, 9]]
  assert batch["labels"][0].tolist() == [-100, -100, 2, -100, -100, -100]
  assert batch["token_valid"].sum(1).tolist() == [3, 1]
  assert batch["num_frames"].tolist() == [2, 3] and batch["sample_id"].tolist() == [12, 4]
  assert batch["timestamps"][0].tolist() == [0.5, 1.5, 0.0]


def test_skip_stats_reports_an_epoch_once_every_worker_passed_it(caplog):
  caplog.set_level(logging.INFO)
  s = stats.SkipStats(num_workers=2)

  def ev(epoch, i, reason):
    return stats.SkipEvent(epoch, i, reason, f"f:{i}").as_tuple()

  def meta(worker, epoch, events, rows):
    return {"worker": worker, "epoch": epoch, "events": events, "row_epochs": rows, "truncated": 0}

  s.update(meta(0, 1, (ev(0, 3, "corrupt"),), (0, 1)))  # worker 0 entered epoch 1; worker 1 still in 0
  assert s.reports == []
  s.update(meta(1, 0, (ev(0, 5, "corrupt"), ev(0, 6, "bad_text")), (0, 0)))
  assert s.reports == []
  s.update(meta(1, 1, (ev(1, 3, "corrupt"),), (1,)))
  assert s.reports == [{"epoch": 0, "samples": 3, "skipped": 3, "by_reason": {"corrupt": 2, "bad_text": 1}}]
  restored = stats.SkipStats(num_workers=2)
  restored.load_state(json.loads(json.dumps(s.state())))
  restored.finish()
  assert restored.reports == [{"epoch": 1, "samples": 2, "skipped": 1, "by_reason": {"corrupt": 1}}]
  assert restored.metrics() == {"skipped/total": 4, "samples": 5, "truncated": 0, "epochs_completed": 2,
                                "skipped/bad_text": 1, "skipped/corrupt": 3}
  with pytest.raises(ValueError, match="num_workers"):
    stats.SkipStats(num_workers=3).load_state(s.state())
