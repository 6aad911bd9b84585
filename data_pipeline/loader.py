"""Grain loaders: TFDS ArrayRecord records -> decoded, tokenized, padded batches (the `qv_jax/batch.py` contract).

Pipeline (grain `MapDataset` / `IterDataset`):

  range(records) -> shuffle(seed; a new permutation each epoch) -> this process's shard (every
  process_count-th of the permutation, all shards equally long) -> repeat(num_epochs) -> (record index, epoch)
  -> SampleProcessor: read the record, decode video / image crops, tokenize (in worker processes)
  -> SkipCountingBatch: drop bad samples, count them, pad to the batch's frame bucket -> mp_prefetch(workers)
  -> LoaderIterator (main process): adds up skip counts, logs epoch reports, strips the bookkeeping.

Batches have exactly the keys of `qv_jax.batch.BATCH_KEYS`, B = data.batch_size / process_count rows (`make_data`
passes loading groups as processes: hosts holding the same batch rows read the same shard); with
data.seq_buckets or data.pack_samples > 1 the packed layout (`PACKED_KEYS`, data_pipeline/packing.py): B rows
of up to pack_samples samples, a sample whose merged-length bound exceeds the largest bucket skipped as
"too_long".
`sample_id` is the record's index in the split (its jsonl line order). The iterator's `get_state()` is a
JSON-serialisable dict (grain pipeline position + skip counters); `set_state()` on a fresh iterator of the same
loader (same config, seed, process and worker count) reproduces the following batches exactly. The iterator is
a `grain.DatasetIterator`, so orbax's `grain.checkpoint.CheckpointHandler` saves and restores it.

Skips: a sample that raises `BadSampleError` (or anything else while being processed) is dropped with a warning
naming its jsonl line, id, media path and reason; `loader_stats()` on the iterator returns cumulative counts
({"skipped/total", "skipped/<reason>", "samples", "truncated", "epochs_completed"}) for the trainer's metrics,
and the end of each epoch is logged with the epoch's counts by reason.
"""

import dataclasses
import json
import logging
import math
import os
from typing import Any

import absl.flags
import grain
import numpy as np

from data_pipeline import collate as collate_lib
from data_pipeline import packing as packing_lib
from data_pipeline import stats as stats_lib
from data_pipeline import tfds_builder
from data_pipeline.errors import BadSampleError
from data_pipeline.image import DEFAULT_PINPOINTS, read_image_crops
from data_pipeline.preprocess import dummy_image, normalize
from data_pipeline.prompt import tokenize_sample
from data_pipeline.seq_buckets import bound_settings, merged_length_bound
from data_pipeline.tokenizer import load_tokenizer, pad_token_id
from data_pipeline.tsv_frames import read_frame_list
from data_pipeline.video import read_video
from qv_jax.batch import IMAGE_TOKEN_INDEX, MODALITY_IMAGE, MODALITY_VIDEO, batch_keys, packed_layout, sequence_buckets
from qv_jax.config.data import validate_data
from qv_jax.config.errors import ConfigError, require

log = logging.getLogger(__name__)

NoRecordsError = tfds_builder.NoRecordsError
NoUsableSamplesError = collate_lib.NoUsableSamplesError
MAX_CONSECUTIVE_SKIPS = 10_000


def _text(value) -> str:
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _seconds(value) -> float | None:
  value = float(value)
  return None if math.isnan(value) else value


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """The plain values a worker needs to turn a record into a padded-ready sample."""
  image_size: int
  max_frames: int
  fps: float
  template: str
  tokenizer_path: str
  max_text_len: int
  max_images: int
  max_bucket: int
  normalize_on_host: bool
  decode_threads: int = 1
  decode_strategy: str = "auto"
  min_frames: int = 2
  max_merged_len: int = 0          # > 0 (packed layout): the largest sequence bucket; longer samples are skipped
  bound: tuple = ()                # seq_buckets.bound_settings as (key, value) pairs


class SampleProcessor:
  """(record index, epoch) -> processed sample dict (see collate.py), or {"skip": SkipEvent tuple}."""

  def __init__(self, source, settings: SampleSettings):
    self._source = source
    self._settings = settings
    self._tokenizer = None

  def __getstate__(self):
    return {"_source": self._source, "_settings": self._settings, "_tokenizer": None}

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      self._tokenizer = load_tokenizer(self._settings.tokenizer_path, self._settings.template)
    return self._tokenizer

  def __call__(self, item: tuple[int, int]) -> dict:
    index, epoch = int(item[0]), int(item[1])
    where = f"record {index}"
    try:
      record = self._source[index]
      where = _describe(record)
      sample = self.process(record)
    except BadSampleError as e:
      return {"skip": stats_lib.SkipEvent(epoch, index, e.reason, f"{where}: {e}").as_tuple()}
    except Exception as e:  # noqa: BLE001 - a bad sample must never stop a pod job; it is counted instead
      log.exception("unexpected error processing %s", where)
      return {"skip": stats_lib.SkipEvent(epoch, index, "internal_error",
                                          f"{where}: {type(e).__name__}: {e}").as_tuple()}
    sample.update(sample_id=index, epoch=epoch)
    return sample

  def process(self, record: dict) -> dict:
    """Decodes and tokenizes one record; raises BadSampleError for anything unusable."""
    s = self._settings
    if _text(record["error"]):
      raise BadSampleError(_text(record["error"]), _text(record["error_detail"]) or "flagged at build time")
    try:
      conversations = json.loads(_text(record["conversations"]))
    except json.JSONDecodeError as e:
      raise BadSampleError("bad_text", f"conversations are not valid JSON: {e}") from None
    modality = _text(record["modality"])
    media = list(record["media"])
    timestamps = None
    crops_per_image = None
    if modality == "video":
      if len(media) != 1:
        raise BadSampleError("bad_conversation", f"a video sample needs 1 media file, has {len(media)}")
      clip = read_video(media[0], num_frames=s.max_frames, fps=s.fps, image_size=s.image_size,
                        threads=s.decode_threads, strategy=s.decode_strategy, min_frames=s.min_frames,
                        start_sec=_seconds(record["start"]), end_sec=_seconds(record["end"]))
      frames, timestamps = clip.frames, list(clip.timestamps)
      expected_placeholders = len(frames) + 1
    elif modality == "frames":  # a video from the reference's TSV frame stores
      clip = read_frame_list(media, num_frames=s.max_frames, image_size=s.image_size, min_frames=s.min_frames,
                             stored_timestamps=record.get("timestamps"), start_sec=_seconds(record["start"]),
                             end_sec=_seconds(record["end"]))
      frames, timestamps, modality = clip.frames, list(clip.timestamps), "video"
      expected_placeholders = len(frames) + 1
    elif modality == "image":
      if not media:
        raise BadSampleError("bad_conversation", "an image sample without images")
      pinpoints = image_pinpoints(s.image_size)
      crops = [read_image_crops(blob, image_size=s.image_size, pinpoints=pinpoints) for blob in media]
      crops_per_image = [len(c) for c in crops]
      frames = np.concatenate(crops, axis=0)
      if len(frames) > min(s.max_images, s.max_bucket):
        raise BadSampleError("too_many_images", f"{len(frames)} crops from {len(media)} image(s) > "
                             f"data.max_images {s.max_images}")
      expected_placeholders = len(frames)
    elif modality == "text":
      frames = dummy_image(s.image_size, s.normalize_on_host)
      expected_placeholders = 1
    else:
      raise BadSampleError("bad_conversation", f"unknown modality {modality!r}")
    tokens = tokenize_sample(conversations, modality=modality, tokenizer=self.tokenizer, template=s.template,
                             timestamps=timestamps, crops_per_image=crops_per_image)
    ids = np.asarray(tokens["input_ids"], np.int32)
    placeholders = int(np.sum(ids == IMAGE_TOKEN_INDEX))
    if placeholders != expected_placeholders:
      raise BadSampleError("bad_conversation", f"{placeholders} <image> placeholders in the token ids, expected "
                           f"{expected_placeholders} for this {modality} sample ({len(frames)} frames/crops)")
    sample = fit_text({k: np.asarray(tokens[k], np.int32) for k in ("input_ids", "labels", "token_frame")},
                      s.max_text_len)
    if s.max_merged_len:
      sample["merged_bound"] = merged_length_bound(sample["input_ids"], sample["token_frame"],
                                                   MODALITY_VIDEO if modality == "video" else MODALITY_IMAGE,
                                                   len(frames), **dict(s.bound))
      if sample["merged_bound"] > s.max_merged_len:
        raise BadSampleError("too_long", f"merged sequence of up to {sample['merged_bound']} tokens > the "
                             f"largest sequence bucket {s.max_merged_len} (data.seq_buckets / max_seq_len)")
    if s.normalize_on_host and frames.dtype == np.uint8:
      frames = normalize(frames)
    n = len(frames)
    sample.update(
        frames=frames,
        timestamps=np.asarray(timestamps if timestamps is not None else np.zeros(n), np.float32),
        modality=MODALITY_VIDEO if modality == "video" else MODALITY_IMAGE)
    return sample


def image_pinpoints(image_size: int) -> tuple[tuple[int, int], ...]:
  """The reference's anyres pinpoints scaled by image_size / 384: identical at 384 (SPEC §1.3), and at a small
  test size (e.g. 98) they still give 2-4 crops per image, as the full model does, instead of 8-15."""
  scale = image_size / 384
  return tuple((max(1, round(w * scale)), max(1, round(h * scale))) for w, h in DEFAULT_PINPOINTS)


def _describe(record: dict) -> str:
  where = f"{_text(record['origin'])} id={_text(record['id'])}"
  paths = [_text(p) for p in record["media_path"]]
  return f"{where} ({', '.join(paths)})" if paths else where


def fit_text(tokens: dict[str, np.ndarray], max_text_len: int) -> dict:
  """Cuts ids past `max_text_len` like the reference's truncation (SPEC §11.16), marking "truncated"; raises
  BadSampleError("text_too_long") if the cut would drop a placeholder or a frame's timestamp tokens."""
  ids = tokens["input_ids"]
  out = dict(tokens, truncated=False)
  if len(ids) <= max_text_len:
    return out
  visual = np.nonzero((ids == IMAGE_TOKEN_INDEX) | (tokens["token_frame"] >= 0))[0]
  if len(visual) and visual[-1] >= max_text_len:
    raise BadSampleError("text_too_long", f"{len(ids)} tokens with visual placeholders up to position "
                         f"{visual[-1]} > data.max_text_len {max_text_len}")
  out.update({k: v[:max_text_len] for k, v in tokens.items()}, truncated=True)
  return out


class _EpochTag:
  """map_with_index: (position in this process's stream, record index) -> (record index, epoch)."""

  def __init__(self, records_per_epoch: int):
    self._records_per_epoch = records_per_epoch

  def __call__(self, position: int, index) -> tuple[int, int]:
    return int(index), position // self._records_per_epoch


class LoaderIterator(grain.DatasetIterator):
  """Batches (dicts of np arrays, `qv_jax.batch.BATCH_KEYS`) with get_state/set_state and `loader_stats()`."""

  def __init__(self, parent: grain.DatasetIterator, skip_stats: stats_lib.SkipStats):
    super().__init__(parent)
    self._skip_stats = skip_stats

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      try:
        element = next(self._parent)
      except StopIteration:
        self._skip_stats.finish()
        raise
      self._skip_stats.update(element["_meta"])
      if "frames" in element:
        return {key: element[key] for key in batch_keys(element)}

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._parent.get_state(), "skips": self._skip_stats.state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._skip_stats.load_state(state["skips"])
    self._parent.set_state(state["pipeline"])

  def loader_stats(self) -> dict[str, int]:
    """Cumulative counts for metrics: skipped/total, skipped/<reason>, samples, truncated, epochs_completed."""
    return self._skip_stats.metrics()

  @property
  def epoch_reports(self) -> list[dict]:
    """The end-of-epoch reports logged by this iterator: {epoch, samples, skipped, by_reason}."""
    return list(self._skip_stats.reports)


class Loader:
  """An iterable of batches; each `iter()` starts a fresh `LoaderIterator` at the beginning of the stream."""

  def __init__(self, dataset: grain.IterDataset, *, num_workers: int, batch_size: int, records: int,
               records_per_epoch: int, context: str):
    self._dataset = dataset
    self.num_workers = num_workers
    self.batch_size = batch_size
    self.num_records = records
    self.records_per_epoch = records_per_epoch
    self._context = context

  def __iter__(self) -> LoaderIterator:
    return LoaderIterator(self._dataset.__iter__(), stats_lib.SkipStats(self.num_workers, context=self._context))


def record_order(records: int, *, seed: int, process_index: int, process_count: int, num_epochs: int | None,
                 shuffle: bool = True) -> grain.MapDataset:
  """(record index, epoch) in the order this process reads them: each epoch a fresh permutation (grain's
  shuffle folds the epoch into the seed), of which this process takes positions process_index,
  process_index + process_count, ... up to records - records % process_count (equal shards)."""
  per_process = records // process_count
  ds = grain.MapDataset.range(records)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds[process_index:per_process * process_count:process_count]
  return ds.repeat(num_epochs).map_with_index(_EpochTag(per_process))


def make_dataset(config, *, split: str = "train", process_index: int = 0, process_count: int = 1,
                 seed: int | None = None, num_epochs: int | None = None, shuffle: bool = True) -> Loader:
  """The loader for `config.data` (dataset_dir, dataset_name, tokenizer_path, shapes, workers).

  Each process reads its own shard: records of every epoch's permutation at positions ≡ process_index (mod
  process_count), the permutation's last (records mod process_count) records left out so all processes see the
  same number per epoch. `seed` defaults to data.shuffle_seed; num_epochs None repeats forever; shuffle=False
  keeps record order (evaluation). Raises ConfigError for bad fields and NoRecordsError (naming the directory)
  when there is nothing to read."""
  d = config.data
  validate_data(d, config.model)
  require(process_count >= 1 and 0 <= process_index < process_count, "process_index",
          f"{process_index} of {process_count} processes")
  require(d.batch_size % process_count == 0, "data.batch_size",
          f"global batch {d.batch_size} is not divisible by {process_count} processes")
  require(num_epochs is None or num_epochs >= 1, "num_epochs", f"must be None or >= 1, got {num_epochs}")
  seed = d.shuffle_seed if seed is None else seed
  require(0 <= seed < 2**32, "data.shuffle_seed", f"must be in [0, 2**32), got {seed}")
  tokenizer_path = os.fspath(d.tokenizer_path)
  require(bool(tokenizer_path) and os.path.isfile(tokenizer_path), "data.tokenizer_path",
          f"{tokenizer_path!r} is not a tokenizer.json file")
  pad_id = pad_token_id(load_tokenizer(tokenizer_path, d.template))

  source = tfds_builder.open_split(d.dataset_dir, d.dataset_name, split)
  records = len(source)
  per_process = records // process_count
  if per_process == 0:
    raise NoRecordsError(f"split {split!r} in {d.dataset_dir} has {records} records, fewer than the "
                         f"{process_count} processes reading it")
  batch_size = d.batch_size // process_count
  settings = SampleSettings(
      image_size=int(d.image_size), max_frames=int(d.max_frames), fps=float(d.fps), template=d.template,
      tokenizer_path=tokenizer_path, max_text_len=int(d.max_text_len), max_images=int(d.max_images),
      max_bucket=int(max(d.frame_buckets)), normalize_on_host=bool(d.normalize_on_host),
      decode_threads=int(d.decode_threads), decode_strategy=str(d.decode_strategy),
      min_frames=int(d.min_frames), max_merged_len=sequence_buckets(d)[-1] if packed_layout(d) else 0,
      bound=tuple(bound_settings(config.model).items()))
  if packed_layout(d):
    collator = packing_lib.PackedCollator(
        image_size=settings.image_size, max_text_len=settings.max_text_len, frame_buckets=d.frame_buckets,
        seq_buckets=sequence_buckets(d), slots=int(d.pack_samples), pad_id=pad_id,
        normalize_on_host=settings.normalize_on_host)
    batching = packing_lib.PackingBatch
  else:
    collator = collate_lib.Collator(image_size=settings.image_size, max_text_len=settings.max_text_len,
                                    frame_buckets=d.frame_buckets, pad_id=pad_id,
                                    normalize_on_host=settings.normalize_on_host)
    batching = collate_lib.SkipCountingBatch
  context = f"{d.dataset_dir}:{split} process {process_index}/{process_count} "

  ds = record_order(records, seed=seed, process_index=process_index, process_count=process_count,
                    num_epochs=num_epochs, shuffle=shuffle).map(SampleProcessor(source, settings))
  read_options = grain.ReadOptions(num_threads=int(d.read_threads), prefetch_buffer_size=int(d.read_buffer))
  batches = batching(
      ds.to_iter_dataset(read_options), batch_size=batch_size, collator=collator,
      drop_remainder=bool(d.drop_remainder), where=context.strip(),
      max_consecutive_skips=min(2 * per_process + 1, MAX_CONSECUTIVE_SKIPS))
  num_workers = int(d.num_workers)
  if num_workers > 0:
    if not absl.flags.FLAGS.is_parsed():
      absl.flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; outside absl.app.run nobody parses
    batches = batches.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=int(d.prefetch)),
        worker_init_fn=collate_lib.init_worker)
  return Loader(batches, num_workers=num_workers, batch_size=batch_size, records=records,
                records_per_epoch=per_process, context=context)


def make_data(config, *, seed: int | None = None):
  """This process's training batches for `qv_jax.train.loop.train(data=...)`: the loader over config.data,
  or generated batches for `data.dataset_name == "synthetic"`. `seed` defaults to data.shuffle_seed.
  Shards by loading group (`qv_jax.sharding.process_loading_group`): hosts whose devices hold the same
  batch rows on config.mesh read the same records (a sample spanning hosts over context or tensor)."""
  from qv_jax.sharding import process_loading_group
  d = config.data
  if d.dataset_name == "synthetic":
    from qv_jax.train.synthetic_batches import process_synthetic_batches
    return process_synthetic_batches(config, seed)
  require(bool(d.dataset_dir) and os.path.isdir(d.dataset_dir), "data.dataset_dir",
          f"{d.dataset_dir!r} is not a directory")
  groups, group = process_loading_group(config.mesh)
  loader = make_dataset(config, split=d.split, process_index=group, process_count=groups, seed=seed)
  return iter(loader)


__all__ = ["Loader", "LoaderIterator", "NoRecordsError", "NoUsableSamplesError", "make_data", "make_dataset",
           "ConfigError"]
