"""Sequence buckets and packed rows in the loader: the exact merged-length bound, first-fit rows in the
smallest bucket, static shapes per bucket pair, exact resume, and too-long samples skipped and counted."""

import itertools
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline import loader
from data_pipeline.packing import PackedCollator, PackingBatch
from data_pipeline.seq_buckets import bound_settings, merged_length_bound, pick_seq_bucket
from qv_jax.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX, MODALITY_EMPTY, MODALITY_VIDEO, PACKED_KEYS
from qv_jax.model import assembly
from qv_jax.model.gumbel import num_cubes
from qv_jax.train.synthetic_batches import SyntheticBatches
from test_loader import _config as loader_config, _good, world  # noqa: F401  (the module's dataset fixture)
from test_train_util import tiny_config

SETTINGS = dict(thumb_len=4, cube_len=4, image_len=4, frames_per_cube=5)


def _video_ids(ts_lens, rng):
  """Pre-merge ids of a video with frame f's timestamp `ts_lens[f]` tokens long."""
  ids, frame = [5, 6, IMAGE_TOKEN_INDEX, 7], [-1, -1, -1, -1]
  for f, n in enumerate(ts_lens):
    ids += list(rng.integers(10, 20, n)) + [IMAGE_TOKEN_INDEX]
    frame += [f] * (n + 1)
  ids += [8, 9, 9]
  frame += [-1, -1, -1]
  return np.asarray(ids, np.int32), np.asarray(frame, np.int32)


def _merged_lengths(ids, frame, starts):
  """The model's merged length for each partition: starts [P, N] marks the frames that start a cube."""
  n = starts.shape[1]

  @jax.jit
  def one(boundary):
    plan = assembly.plan_sequence(
        jnp.asarray(ids)[None], jnp.asarray(frame)[None], jnp.ones((1, len(ids)), bool),
        jnp.asarray([MODALITY_VIDEO]), boundary[None], jnp.cumsum(boundary)[None].astype(jnp.int32) - 1,
        thumb_len=4, cube_len=4, num_cube_slots=num_cubes(n), image_len=4, num_image_slots=n, max_seq_len=512)
    return plan.length[0]

  return np.asarray(jax.vmap(one)(jnp.asarray(starts, jnp.float32)))


@pytest.mark.parametrize("num_frames", [7, 15])
def test_video_bound_is_the_largest_merged_length_over_all_partitions(num_frames):
  rng = np.random.default_rng(num_frames)
  ts_lens = rng.integers(1, 5, num_frames)
  ids, frame = _video_ids(ts_lens, rng)
  k = num_cubes(num_frames) - 1
  starts = []
  for inner in itertools.combinations(range(1, num_frames), k):
    starts.append(np.zeros(num_frames))
    starts[-1][[0, *inner]] = 1
  lengths = _merged_lengths(ids, frame, np.stack(starts))
  bound = merged_length_bound(ids, frame, MODALITY_VIDEO, num_frames, **SETTINGS)
  assert bound == lengths.max() and lengths.min() < bound


def test_image_bound_is_exact():
  ids = np.asarray([1, 2, IMAGE_TOKEN_INDEX, 3, IMAGE_TOKEN_INDEX, 4], np.int32)
  assert merged_length_bound(ids, np.full(6, -1), 0, 2, **SETTINGS) == 4 + 2 * 4


def test_pick_seq_bucket():
  assert pick_seq_bucket(100, (64, 128, 256)) == 128
  assert pick_seq_bucket(64, (64, 128)) == 64
  with pytest.raises(ValueError, match="data.seq_buckets"):
    pick_seq_bucket(300, (64, 128, 256))


def _synthetic_samples(config, n, seed=1):
  synth = SyntheticBatches(config, seed=seed, image_fraction=0.6)
  out = []
  for sid in range(n):
    x = synth.processed(sid)
    x["merged_bound"] = merged_length_bound(x["input_ids"], x["token_frame"], x["modality"], len(x["frames"]),
                                            **bound_settings(config.model))
    out.append(x)
  return out


def _collator(config, seq_buckets, slots):
  return PackedCollator(image_size=config.data.image_size, max_text_len=config.data.max_text_len,
                        frame_buckets=config.data.frame_buckets, seq_buckets=seq_buckets, slots=slots, pad_id=0,
                        normalize_on_host=False)


def _stream(samples, skip_every=0):
  """An in-memory grain stream of processed samples, every `skip_every`-th one a bad record."""
  items = []
  for i, x in enumerate(samples):
    if skip_every and i % skip_every == skip_every - 1:
      items.append({"skip": (0, x["sample_id"], "bad_video", f"record {x['sample_id']}: broken")})
    else:
      items.append(x)
  return grain.MapDataset.source(items).to_iter_dataset()


def test_packed_rows_first_fit_smallest_bucket_and_each_sample_intact():
  config = tiny_config(1)
  samples = _synthetic_samples(config, 24)
  buckets = (96, 160, 256)
  batches = list(PackingBatch(_stream(samples), batch_size=2, collator=_collator(config, buckets, 4),
                              drop_remainder=False))
  seen = []
  for batch in batches:
    assert tuple(k for k in batch if k != "_meta") == PACKED_KEYS
    rows = batch["segment_ids"].shape[1]
    fullest = max(int(batch["sample_offset"][r, -1] + (batch["segment_ids"][r] == 3).sum()) for r in range(2))
    assert rows == pick_seq_bucket(max(fullest, 1), buckets)
    for r, j in zip(*np.nonzero(batch["modality"] != MODALITY_EMPTY)):
      x = samples[int(batch["sample_id"][r, j])]
      tokens = batch["token_slot"][r] == j
      np.testing.assert_array_equal(batch["input_ids"][r, tokens], x["input_ids"])
      np.testing.assert_array_equal(batch["token_frame"][r, tokens], x["token_frame"])
      np.testing.assert_array_equal(batch["labels"][r, tokens][1:], x["labels"][1:])
      assert batch["labels"][r, tokens][0] == IGNORE_INDEX
      assert (batch["segment_ids"][r] == j).sum() == x["merged_bound"]
      assert batch["segment_ids"][r, batch["sample_offset"][r, j]] == j
      n = len(x["frames"])
      np.testing.assert_array_equal(batch["frames"][r, j, :n], x["frames"])
      assert batch["num_frames"][r, j] == n
      seen.append(x["sample_id"])
  assert seen == list(range(24))      # stream order, every sample once
  assert len(batches) < 24 / 2         # several samples per row


def test_same_bucket_pair_same_shapes_one_trace():
  config = tiny_config(1)
  samples = _synthetic_samples(config, 40, seed=3)
  collate = _collator(config, (256,), 3)
  traces = []

  @jax.jit
  def count(batch):
    traces.append(1)
    return jax.tree.map(lambda x: x.sum(), batch)

  it = iter(PackingBatch(_stream(samples), batch_size=2, collator=collate, drop_remainder=True))
  batches = [next(it) for _ in range(3)]
  for b in batches:
    b.pop("_meta")
    count(b)
  assert len({tuple((k, v.shape) for k, v in b.items()) for b in batches}) == 1
  assert len(traces) == 1
  assert not all(np.array_equal(batches[0]["input_ids"], b["input_ids"]) for b in batches[1:])


def test_resume_mid_stream_is_bit_identical_with_a_held_sample_and_skips():
  config = tiny_config(1)
  samples = _synthetic_samples(config, 120, seed=4)
  make = lambda: iter(PackingBatch(_stream(samples, skip_every=5), batch_size=2,
                                   collator=_collator(config, (96, 160), 6), drop_remainder=True))
  it = make()
  next(it)
  while it._held is None:           # stop where a sample waits for the next batch
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  fresh = make()
  fresh.set_state(state)
  got = [next(fresh) for _ in range(3)]
  for a, b in zip(expected, got):
    assert a["_meta"] == b["_meta"]
    for k in PACKED_KEYS:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_loader_packs_resumes_exactly_and_skips_too_long_samples(world):  # noqa: F811
  lengths = {}
  for batch in loader.make_dataset(loader_config(world, pack_samples=3, drop_remainder=False),
                                   num_epochs=1, seed=3):
    for r, j in zip(*np.nonzero(batch["modality"] != MODALITY_EMPTY)):
      lengths[int(batch["sample_id"][r, j])] = int((batch["segment_ids"][r] == j).sum())
  assert set(lengths) == set(_good(world))
  limit = max(lengths.values()) - 1
  too_long = {i for i, n in lengths.items() if n > limit}
  assert too_long and len(too_long) < len(lengths)
  config = loader_config(world, seq_buckets=(limit // 2, limit), pack_samples=3)
  it = iter(loader.make_dataset(loader_config(world, seq_buckets=(limit // 2, limit), pack_samples=3,
                                               drop_remainder=False), num_epochs=1, seed=3))
  got = [sid for b in it for sid in b["sample_id"][b["modality"] != MODALITY_EMPTY].tolist()]
  assert set(got) == set(lengths) - too_long
  assert it.loader_stats()["skipped/too_long"] == len(too_long)

  data = loader.make_dataset(config, seed=3)
  it = iter(data)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  fresh = iter(loader.make_dataset(config, seed=3))
  fresh.set_state(state)
  for a in expected:
    b = next(fresh)
    for k in PACKED_KEYS:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert fresh.loader_stats() == it.loader_stats()


def test_loader_packed_resume_with_two_workers_is_bit_identical(world):  # noqa: F811
  config = loader_config(world, pack_samples=3, num_workers=2)
  it = iter(loader.make_dataset(config, seed=4))
  try:
    _ = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    expected_stats = it.loader_stats()
  finally:
    it.close()
  fresh = iter(loader.make_dataset(config, seed=4))
  try:
    fresh.set_state(state)
    for a in expected:
      b = next(fresh)
      for k in PACKED_KEYS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert fresh.loader_stats() == expected_stats
  finally:
    fresh.close()


def test_config_validation_names_the_field():
  from qv_jax.config import ConfigError
  from qv_jax.config.data import validate_data
  config = tiny_config(1)
  for field, value in (("seq_buckets", (256, 128)), ("seq_buckets", (64, 4096)), ("pack_samples", 0)):
    c = tiny_config(1)
    setattr(c.data, field, value)
    with pytest.raises(ConfigError, match=f"data.{field}"):
      validate_data(c.data, c.model)
  config.data.seq_buckets, config.data.pack_samples = (64, 128), 4
  validate_data(config.data, config.model)


def test_packer_refuses_a_sample_longer_than_the_largest_bucket_by_name():
  config = tiny_config(1)
  samples = _synthetic_samples(config, 3)
  samples[1]["merged_bound"] = 10_000
  it = iter(PackingBatch(_stream(samples), batch_size=1, collator=_collator(config, (256,), 1),
                         drop_remainder=False))
  next(it)
  with pytest.raises(ValueError, match="sample 1: merged length bound 10000"):
    next(it)
