"""The `data` section: frame sampling, prompt template, static (bucketed) shapes and the loader."""

import ml_collections

from qv_jax.config.errors import require

TEMPLATES = ("qwen2", "llama3")


def data_defaults(size: str) -> ml_collections.ConfigDict:
  small = size in ("tiny", "small")
  return ml_collections.ConfigDict(dict(
      dataset_dir="",              # TFDS data_dir holding the built dataset
      dataset_name="",             # TFDS builder name
      split="train",
      tokenizer_path="",           # local tokenizer.json (never downloaded)
      template="qwen2",
      fps=1.0,
      max_frames=16 if small else 420,        # frames sampled per video (SPEC §1.1 num_frames)
      frame_buckets=(16,) if small else (420,),  # static F values the step is compiled for
      image_size=98 if small else 384,
      normalize_on_host=False,     # False: uint8 frames go to the device and are normalised there
      max_images=5,                # anyres crops (1 base + up to 4) per image sample
      max_text_len=512 if small else 4096,    # pre-merge token slots (ids with placeholders)
      max_seq_len=512 if small else 16384,    # post-merge decoder sequence length
      seq_buckets=(),              # static decoder lengths (docs/packing.md); () = every batch at max_seq_len
      pack_samples=1,              # samples per decoder row (packed rows); 1 = one sample per row
      batch_size=2 if small else 8,           # global batch
      num_workers=0,
      prefetch=2,
      read_threads=2,              # loader: threads decoding samples in each worker (or the main process)
      read_buffer=4,               # loader: decoded samples buffered ahead per worker (memory: ~clip size each)
      decode_threads=1,            # decode: FFmpeg threads per video read (0 = one per core)
      decode_strategy="auto",      # decode: "auto" (skip unneeded GOPs/pictures), "gop", "scan", "sequential"
      min_frames=2,                # decode: fewer frames -> retry at fps + 1, then skip the sample (SPEC §1.1.7)
      shuffle_seed=0,
      drop_remainder=True,
  ))


def validate_data(d, model) -> None:
  f = "data"
  require(d.template in TEMPLATES, f"{f}.template", f"{d.template!r}; expected one of {TEMPLATES}")
  require(d.fps > 0, f"{f}.fps", f"must be positive, got {d.fps}")
  require(round(d.fps) >= 1, f"{f}.fps", f"{d.fps} takes round(fps) = 0 frames per second (SPEC §1.1); use fps > 0.5")
  require(d.decode_threads >= 0, f"{f}.decode_threads", f"must be >= 0, got {d.decode_threads}")
  require(d.decode_strategy in ("auto", "gop", "scan", "sequential"), f"{f}.decode_strategy",
          f"{d.decode_strategy!r}; expected 'auto', 'gop', 'scan' or 'sequential'")
  require(d.min_frames >= 1, f"{f}.min_frames", f"must be >= 1, got {d.min_frames}")
  require(d.max_frames >= 2, f"{f}.max_frames", f"a video needs at least 2 frames, got {d.max_frames}")
  buckets = tuple(d.frame_buckets)
  require(len(buckets) > 0 and all(b >= 2 for b in buckets) and list(buckets) == sorted(set(buckets)),
          f"{f}.frame_buckets", f"{buckets} must be strictly increasing frame counts >= 2")
  require(buckets[-1] >= d.max_frames, f"{f}.frame_buckets",
          f"largest bucket {buckets[-1]} < data.max_frames {d.max_frames}")
  require(d.image_size == model.vision.image_size, f"{f}.image_size",
          f"{d.image_size} != model.vision.image_size {model.vision.image_size}")
  require(d.batch_size > 0, f"{f}.batch_size", f"must be positive, got {d.batch_size}")
  require(d.num_workers >= 0, f"{f}.num_workers", f"must be >= 0, got {d.num_workers}")
  require(d.prefetch >= 1, f"{f}.prefetch", f"must be >= 1 batch per worker, got {d.prefetch}")
  require(d.read_threads >= 0 and d.read_buffer >= 1, f"{f}.read_threads",
          f"read_threads must be >= 0 and read_buffer >= 1, got {d.read_threads} and {d.read_buffer}")
  require(d.max_seq_len > 0 and d.max_text_len > 0, f"{f}.max_seq_len", "lengths must be positive")
  seq = tuple(int(b) for b in d.seq_buckets)
  require(all(b > 0 for b in seq) and list(seq) == sorted(set(seq)), f"{f}.seq_buckets",
          f"{seq} must be strictly increasing positive lengths")
  require(not seq or seq[-1] <= d.max_seq_len, f"{f}.seq_buckets",
          f"largest bucket {seq[-1] if seq else 0} > data.max_seq_len {d.max_seq_len}")
  require(int(d.pack_samples) >= 1, f"{f}.pack_samples", f"must be >= 1, got {d.pack_samples}")
