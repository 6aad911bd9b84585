"""Padding to the static shapes of `qv_jax/batch.py`, and the batching step that skips and counts bad samples.

Bucketing choice: a batch is padded to the smallest bucket of `data.frame_buckets` that holds its longest
sample (frames of a video, crops of an image sample). Samples keep their shuffled order (no regrouping, so the
iterator state stays a plain position); with one bucket (the default) every batch has the same shape.

A processed sample (the output of `loader.SampleProcessor`) is a dict: frames [n, S, S, 3] (uint8, or float32
when `data.normalize_on_host`), timestamps float32 [n], modality int, input_ids / labels / token_frame int32
[t ≤ L], sample_id int, epoch int. A bad sample is {"skip": SkipEvent tuple} instead.
"""

from typing import Callable, Sequence

import grain
import numpy as np
from grain._src.python.ipc import shared_memory_array

from qv_jax.batch import BATCH_KEYS, IGNORE_INDEX

_WORKER_INDEX = 0  # set in each grain worker process by `init_worker`


class NoUsableSamplesError(RuntimeError):
  """Every record in a long run was bad: the dataset (or its media root) is broken, not a few samples."""


def init_worker(worker_index: int, worker_count: int) -> None:
  """grain `worker_init_fn`: lets batches say which worker built them (for exact per-epoch skip reports)."""
  del worker_count
  global _WORKER_INDEX
  _WORKER_INDEX = worker_index


def pick_bucket(num_frames: int, buckets: Sequence[int]) -> int:
  """The smallest bucket ≥ num_frames; ValueError if none is."""
  for bucket in buckets:
    if num_frames <= bucket:
      return int(bucket)
  raise ValueError(f"{num_frames} frames do not fit the largest frame bucket {buckets[-1]} "
                   "(config field `data.frame_buckets`)")


class Collator:
  """Pads processed samples into one batch dict with exactly the keys, dtypes and shapes of `batch_shapes`."""

  def __init__(self, *, image_size: int, max_text_len: int, frame_buckets: Sequence[int], pad_id: int,
               normalize_on_host: bool):
    self.image_size = image_size
    self.max_text_len = max_text_len
    self.frame_buckets = tuple(int(b) for b in frame_buckets)
    self.pad_id = int(pad_id)
    self.frames_dtype = np.float32 if normalize_on_host else np.uint8

  def __call__(self, samples: Sequence[dict], alloc: Callable = np.empty) -> dict[str, np.ndarray]:
    """`alloc(shape, dtype)` makes the (uninitialised) frames array, e.g. in shared memory."""
    b, s, length = len(samples), self.image_size, self.max_text_len
    f = pick_bucket(max(len(x["frames"]) for x in samples), self.frame_buckets)
    frames = alloc((b, f, s, s, 3), self.frames_dtype)
    batch = {
        "frames": frames,
        "num_frames": np.zeros((b,), np.int32),
        "modality": np.zeros((b,), np.int32),
        "input_ids": np.full((b, length), self.pad_id, np.int32),
        "labels": np.full((b, length), IGNORE_INDEX, np.int32),
        "token_frame": np.full((b, length), -1, np.int32),
        "token_valid": np.zeros((b, length), bool),
        "timestamps": np.zeros((b, f), np.float32),
        "sample_id": np.zeros((b,), np.int32),
    }
    for row, x in enumerate(samples):
      n, t = len(x["frames"]), len(x["input_ids"])
      if t > length:
        raise ValueError(f"sample {x['sample_id']}: {t} tokens > data.max_text_len {length} (not fitted)")
      frames[row, :n] = x["frames"]
      frames[row, n:] = 0
      batch["timestamps"][row, :n] = x["timestamps"]
      batch["num_frames"][row] = n
      batch["modality"][row] = x["modality"]
      batch["sample_id"][row] = x["sample_id"]
      for key in ("input_ids", "labels", "token_frame"):
        batch[key][row, :t] = x[key]
      batch["token_valid"][row, :t] = True
    assert tuple(batch) == BATCH_KEYS
    return batch


class SkipCountingBatch(grain.IterDataset):
  """Batches processed samples, dropping bad ones; every output carries "_meta" with the skips it met.

  "_meta" = {"worker": grain worker index, "epoch": epoch of the last record read, "events": skip event tuples,
  "row_epochs": epoch of each row, "truncated": rows whose text was cut}. When the input ends with skips but no
  full batch (drop_remainder), a meta-only element {"_meta": ...} carries them, so no count is lost.
  """

  def __init__(self, parent: grain.IterDataset, *, batch_size: int, collator: Collator, drop_remainder: bool,
               max_consecutive_skips: int = 10_000, where: str = "loader"):
    super().__init__(parent)
    self._batch_size = batch_size
    self._collator = collator
    self._drop_remainder = drop_remainder
    self._max_consecutive_skips = max_consecutive_skips
    self._where = where
    self._shared_memory = False

  def enable_shared_memory_output(self) -> None:
    """grain's `SupportsSharedMemoryOutput`: build `frames` straight into shared memory in the workers."""
    self._shared_memory = True

  def __iter__(self):
    return _SkipCountingBatchIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return f"SkipCountingBatch(batch_size={self._batch_size}, drop_remainder={self._drop_remainder})"


class _SkipCountingBatchIterator(grain.DatasetIterator):

  def __init__(self, parent, config: SkipCountingBatch):
    super().__init__(parent)
    self._batch_size = config._batch_size
    self._collator = config._collator
    self._drop_remainder = config._drop_remainder
    self._max_run = config._max_consecutive_skips
    self._where = config._where
    self._alloc = shared_memory_array.SharedMemoryArray if config._shared_memory else np.empty
    self._run = 0  # consecutive bad records

  def __next__(self):
    rows, events, epoch, truncated = [], [], 0, 0
    while len(rows) < self._batch_size:
      element, epoch, _ = self._read(events, epoch)
      if element is None:
        if rows and not self._drop_remainder:
          break
        if events:
          return {"_meta": self._meta(epoch, events, [], 0)}
        raise StopIteration
      rows.append(element)
      truncated += int(element.get("truncated", False))
    batch = self._collator(rows, self._alloc)
    batch["_meta"] = self._meta(epoch, events, [r["epoch"] for r in rows], truncated)
    return batch

  def _read(self, events: list, epoch: int, track_state: bool = False):
    """The next good sample, appending skip events on the way: (sample or None at the end, epoch, the
    parent's state just before that sample when track_state)."""
    while True:
      before = self._parent.get_state() if track_state else None
      try:
        element = next(self._parent)
      except StopIteration:
        return None, epoch, None
      if "skip" not in element:
        self._run = 0
        return element, element["epoch"], before
      epoch = element["skip"][0]
      events.append(element["skip"])
      self._run += 1
      if self._run >= self._max_run:
        raise NoUsableSamplesError(
            f"{self._where}: {self._run} records in a row were bad (last: {element['skip'][3]}); check the "
            "dataset's media root and jsonl")

  @staticmethod
  def _meta(epoch, events, row_epochs, truncated) -> dict:
    return {"worker": _WORKER_INDEX, "epoch": int(epoch), "events": tuple(events),
            "row_epochs": tuple(int(e) for e in row_epochs), "truncated": truncated}

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)
