"""Deterministic batches in the `qv_jax/batch.py` contract without files or a tokenizer: for tests, the
benchmark and dry runs of the trainer (`--data synthetic`).

Sample i (its global index) is a function of (seed, i) only: a video of N frames made of a few solid-colour
scenes, the pre-merge ids of a video prompt (special tokens, per-frame timestamp tokens, placeholders) and an
answer naming the scenes' colours in order; with `image_fraction` > 0 some samples are image samples.
The iterator yields this process's share of each global batch and saves/restores its position.
"""

from __future__ import annotations

import numpy as np

from qv_jax.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX, MODALITY_IMAGE, MODALITY_VIDEO, batch_shapes

NUM_COLOURS = 8


class SyntheticBatches:
  """Iterator of batches (dicts of np arrays) for process `process_index` of `process_count`."""

  def __init__(self, config, *, seed: int = 0, process_index: int = 0, process_count: int = 1,
               image_fraction: float = 0.0, num_frames: int | None = None):
    d = config.data
    self.vocab = int(config.model.decoder.vocab_size)
    if self.vocab < 64:
      raise ValueError(f"synthetic batches need a vocabulary of at least 64 ids, got {self.vocab}")
    if d.batch_size % process_count:
      raise ValueError(f"data.batch_size {d.batch_size} is not divisible by {process_count} processes")
    self.global_batch = int(d.batch_size)
    self.local_batch = self.global_batch // process_count
    self.offset = process_index * self.local_batch
    self.frames = int(num_frames or d.frame_buckets[-1])
    self.max_frames = min(int(d.max_frames), self.frames)
    self.size = int(d.image_size)
    self.text_len = int(d.max_text_len)
    self.seed = int(seed)
    self.normalize = bool(d.normalize_on_host)
    self.image_fraction = float(image_fraction)
    self.shapes = batch_shapes(config, self.local_batch, self.frames)
    self.next_index = 0
    v = self.vocab
    self.special = dict(video_start=v - 8, video_end=v - 7, thumb_start=v - 6, thumb_end=v - 5,
                        im_start=v - 4, im_end=v - 3, patch_start=v - 2, patch_end=v - 1)

  def __iter__(self):
    return self

  def get_state(self) -> dict:
    return {"next_index": self.next_index}

  def set_state(self, state: dict):
    self.next_index = int(state["next_index"])

  def __next__(self) -> dict:
    start = self.next_index * self.global_batch + self.offset
    self.next_index += 1
    return self.batch_for([start + j for j in range(self.local_batch)])

  def batch_for(self, sample_ids: list[int]) -> dict:
    out = {k: np.zeros(shape, dtype) for k, (shape, dtype) in self.shapes.items()}
    out["labels"][:] = IGNORE_INDEX
    out["token_frame"][:] = -1
    for row, sid in enumerate(sample_ids):
      sample = self.sample(sid)
      n = len(sample["input_ids"])
      if n > self.text_len:
        raise ValueError(f"synthetic sample {sid} has {n} tokens > data.max_text_len {self.text_len}")
      for k in ("input_ids", "labels", "token_frame"):
        out[k][row, :n] = sample[k]
      out["token_valid"][row, :n] = True
      nf = sample["frames"].shape[0]
      frames = sample["frames"]
      if self.normalize:
        frames = (frames.astype(np.float32) / 255.0 - 0.5) / 0.5
      out["frames"][row, :nf] = frames
      out["num_frames"][row] = nf
      out["modality"][row] = sample["modality"]
      out["timestamps"][row, :nf] = np.arange(nf) + 0.5
      out["sample_id"][row] = sid
    return out

  def processed(self, sid: int) -> dict:
    """Sample `sid` as the loader's workers give it (data_pipeline/collate.py): with timestamps, sample_id,
    epoch."""
    x = {k: (np.asarray(v, np.int32) if k in ("input_ids", "labels", "token_frame") else v)
         for k, v in self.sample(sid).items()}
    n = len(x["frames"])
    if self.normalize:
      x["frames"] = (x["frames"].astype(np.float32) / 255.0 - 0.5) / 0.5
    x.update(timestamps=np.arange(n, dtype=np.float32) + 0.5, sample_id=sid, epoch=0)
    return x

  def sample(self, sid: int) -> dict:
    rng = np.random.default_rng([self.seed, sid])
    if rng.random() < self.image_fraction:
      return self._image_sample(rng)
    n = int(rng.integers(max(2, self.max_frames // 2), self.max_frames + 1))
    scenes = int(rng.integers(1, 4))
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(scenes - 1, n - 1), replace=False))
    colours = rng.integers(0, NUM_COLOURS, size=len(cuts) + 1)
    scene_of = np.searchsorted(cuts, np.arange(n), side="right")
    frames = self._paint(colours[scene_of], rng)
    s = self.special
    ids, labels, tframe = [], [], []

    def add(tokens, frame=-1, supervised=False):
      for t in tokens:
        ids.append(int(t))
        labels.append(int(t) if supervised else IGNORE_INDEX)
        tframe.append(frame)

    add([1, 2, 3, s["video_start"], s["thumb_start"], IMAGE_TOKEN_INDEX, s["thumb_end"]])
    for f in range(n):
      add([10 + int(d) for d in str(f + 0.5).replace(".", "")], frame=f)   # "{f}.5" as digit tokens
      add([IMAGE_TOKEN_INDEX], frame=f)
    add([s["video_end"], 4, 5, 6, 7, 8, 9])
    add([30 + c for c in colours] + [6, 7], supervised=True)
    return dict(input_ids=ids, labels=labels, token_frame=tframe, frames=frames, modality=MODALITY_VIDEO)

  def _image_sample(self, rng) -> dict:
    crops = int(rng.integers(1, min(3, self.frames) + 1))
    colours = rng.integers(0, NUM_COLOURS, size=crops)
    s = self.special
    ids = [1, 2, 3, s["im_start"]]
    for _ in range(crops):
      ids += [s["patch_start"], IMAGE_TOKEN_INDEX, s["patch_end"]]
    ids += [s["im_end"], 4, 5, 8, 9]
    answer = [30 + c for c in colours] + [6, 7]
    labels = [IGNORE_INDEX] * len(ids) + answer
    return dict(input_ids=ids + answer, labels=labels, token_frame=[-1] * len(labels),
                frames=self._paint(colours, rng), modality=MODALITY_IMAGE)

  def _paint(self, colour_ids, rng) -> np.ndarray:
    palette = np.random.default_rng(12345).integers(0, 256, size=(NUM_COLOURS, 3))
    base = palette[np.asarray(colour_ids)][:, None, None, :]
    noise = rng.integers(-12, 13, size=(len(colour_ids), self.size, self.size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def process_synthetic_batches(config, seed: int | None = None, mesh=None) -> SyntheticBatches:
  """This process's loading group's share of the generated batches (`data.dataset_name == "synthetic"`) on
  `mesh` (default: the mesh of config.mesh over all devices); `seed` defaults to data.shuffle_seed."""
  from qv_jax.sharding import loading_groups, process_loading_group
  groups, group = process_loading_group(config.mesh) if mesh is None else loading_groups(mesh)
  return SyntheticBatches(config, seed=int(config.data.shuffle_seed if seed is None else seed),
                          process_index=group, process_count=groups)
