"""Packed rows: several processed samples per decoder row, in the packed layout of `qv_jax/batch.py`.

Each sample reserves its exact merged-length bound (`seq_buckets.merged_length_bound`, computed by the
worker as sample["merged_bound"]) at an offset of its row; a batch has R rows of at most P samples. Samples
are placed first-fit in stream order: a sample goes to the first row with a free slot and room for it under
the largest sequence bucket; when no row takes it, the batch is finished and padded to the smallest sequence
bucket holding its fullest row (and the frame bucket of its longest clip), and the sample opens the next batch.

Why not grain's `FirstFitPackIterDataset`: it concatenates every feature along axis 0 up to a target length,
while here the packed length is the merged length (no feature's length) and frames must stay per sample
(each sample gets its own vision / cubing pass). The iterator state follows grain's packing iterators:
the parent's state from before the sample held over to the next batch, so a restored iterator reads that
sample again and the following batches are identical.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from data_pipeline import collate as collate_lib
from data_pipeline.seq_buckets import pick_seq_bucket
from qv_jax.batch import IGNORE_INDEX, MODALITY_EMPTY, PACKED_KEYS


class RowPacker:
  """First-fit placement of samples (by merged bound) into R rows of P slots and `max_len` slots each."""

  def __init__(self, rows: int, slots: int, max_len: int):
    self.rows, self.slots, self.max_len = rows, slots, max_len
    self.reset()

  def reset(self) -> None:
    self.members: list[list[dict]] = [[] for _ in range(self.rows)]
    self.used = [0] * self.rows

  def add(self, sample: dict) -> bool:
    """Places the sample; False when no row has a free slot and room for it."""
    need = int(sample["merged_bound"])
    for r in range(self.rows):
      if len(self.members[r]) < self.slots and self.used[r] + need <= self.max_len:
        self.members[r].append(sample)
        self.used[r] += need
        return True
    return False

  @property
  def count(self) -> int:
    return sum(len(m) for m in self.members)


class PackedCollator:
  """Rows of processed samples -> one packed batch dict (`qv_jax.batch.PACKED_KEYS`)."""

  def __init__(self, *, image_size: int, max_text_len: int, frame_buckets: Sequence[int],
               seq_buckets: Sequence[int], slots: int, pad_id: int, normalize_on_host: bool):
    self.image_size = image_size
    self.max_text_len = max_text_len
    self.frame_buckets = tuple(int(b) for b in frame_buckets)
    self.seq_buckets = tuple(int(b) for b in seq_buckets)
    self.slots = int(slots)
    self.pad_id = int(pad_id)
    self.frames_dtype = np.float32 if normalize_on_host else np.uint8

  def __call__(self, rows: Sequence[Sequence[dict]], alloc: Callable = np.empty) -> dict[str, np.ndarray]:
    r, p, s = len(rows), self.slots, self.image_size
    samples = [x for row in rows for x in row]
    f = collate_lib.pick_bucket(max(len(x["frames"]) for x in samples), self.frame_buckets)
    n = pick_seq_bucket(max(sum(int(x["merged_bound"]) for x in row) for row in rows), self.seq_buckets)
    t = self.max_text_len * p
    frames = alloc((r, p, f, s, s, 3), self.frames_dtype)
    frames[...] = 0
    batch = {
        "frames": frames,
        "num_frames": np.zeros((r, p), np.int32),
        "modality": np.full((r, p), MODALITY_EMPTY, np.int32),
        "input_ids": np.full((r, t), self.pad_id, np.int32),
        "labels": np.full((r, t), IGNORE_INDEX, np.int32),
        "token_frame": np.full((r, t), -1, np.int32),
        "token_valid": np.zeros((r, t), bool),
        "timestamps": np.zeros((r, p, f), np.float32),
        "sample_id": np.full((r, p), -1, np.int32),
        "token_slot": np.full((r, t), -1, np.int32),
        "sample_offset": np.zeros((r, p), np.int32),
        "segment_ids": np.full((r, n), -1, np.int32),
    }
    for i, row in enumerate(rows):
      text_at = seq_at = 0
      for j, x in enumerate(row):
        nf, length, bound = len(x["frames"]), len(x["input_ids"]), int(x["merged_bound"])
        if length > self.max_text_len:
          raise ValueError(f"sample {x['sample_id']}: {length} tokens > data.max_text_len {self.max_text_len}")
        frames[i, j, :nf] = x["frames"]
        batch["timestamps"][i, j, :nf] = x["timestamps"]
        batch["num_frames"][i, j] = nf
        batch["modality"][i, j] = x["modality"]
        batch["sample_id"][i, j] = x["sample_id"]
        span = slice(text_at, text_at + length)
        for key in ("input_ids", "labels", "token_frame"):
          batch[key][i, span] = x[key]
        batch["labels"][i, text_at] = IGNORE_INDEX     # never a target: the shift stops at the sample's start
        batch["token_valid"][i, span] = True
        batch["token_slot"][i, span] = j
        batch["sample_offset"][i, j] = seq_at
        batch["segment_ids"][i, seq_at:seq_at + bound] = j
        text_at += length
        seq_at += bound
      batch["sample_offset"][i, len(row):] = seq_at
    assert tuple(batch) == PACKED_KEYS
    return batch


class _PackingBatchIterator(collate_lib._SkipCountingBatchIterator):
  """`SkipCountingBatch` with first-fit packing; the state excludes the sample held over."""

  def __init__(self, parent, config):
    super().__init__(parent, config)
    self._packer = RowPacker(config._batch_size, config._collator.slots, config._collator.seq_buckets[-1])
    self._held = None                   # (sample, parent state before it was read)
    self._state = None                  # the state to resume right after the last emitted batch

  def __next__(self):
    packer, events, epoch, truncated = self._packer, [], 0, 0
    packer.reset()
    if self._held is not None:
      sample, _ = self._held
      self._held = None
      self._place_first(sample)
      epoch, truncated = sample["epoch"], int(sample.get("truncated", False))
    while packer.count < packer.rows * packer.slots:
      element, epoch, before = self._read(events, epoch, track_state=True)
      if element is None:
        if packer.count and not self._drop_remainder:
          break
        self._state = None
        if events:
          return {"_meta": self._meta(epoch, events, [], 0)}
        raise StopIteration
      if not packer.count:
        self._place_first(element)
      elif not packer.add(element):
        self._held = (element, before)
        break
      truncated += int(element.get("truncated", False))
    self._state = self._held[1] if self._held is not None else None
    rows = packer.members                 # all R rows (an empty one only at the end of the stream)
    batch = self._collator(rows, self._alloc)
    batch["_meta"] = self._meta(epoch, events, [x["epoch"] for row in rows for x in row], truncated)
    return batch

  def _place_first(self, sample: dict) -> None:
    if not self._packer.add(sample):
      raise ValueError(f"sample {sample['sample_id']}: merged length bound {sample['merged_bound']} > the "
                       f"largest sequence bucket {self._packer.max_len} (the loader skips these as too_long)")

  def get_state(self):
    return self._parent.get_state() if self._state is None else self._state

  def set_state(self, state):
    self._held, self._state = None, None
    self._parent.set_state(state)


class PackingBatch(collate_lib.SkipCountingBatch):
  """`SkipCountingBatch` whose batches are packed rows: batch_size rows, collator a `PackedCollator`."""

  def __iter__(self):
    return _PackingBatchIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return f"PackingBatch(rows={self._batch_size}, slots={self._collator.slots})"
