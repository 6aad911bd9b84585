"""The batch contract between `data_pipeline` (producer) and the model / trainer (consumer).

Every array has a static shape fixed by the config: B = data.batch_size (per process: the local share),
F = a frame bucket from data.frame_buckets, S = data.image_size, L = data.max_text_len.

| key           | dtype   | shape           | meaning |
|---------------|---------|-----------------|---------|
| frames        | uint8   | [B, F, S, S, 3] | RGB frames (video) or anyres crops (image sample), zero-padded past `num_frames`. float32 in [-1, 1] instead when data.normalize_on_host |
| num_frames    | int32   | [B]             | valid frames (video) or crops/images (image sample), ≥ 1 |
| modality      | int32   | [B]             | MODALITY_VIDEO or MODALITY_IMAGE (text-only samples are image samples with one mid-grey dummy image: uint8 128, or 0.0 when data.normalize_on_host; `preprocess.dummy_image`) |
| input_ids     | int32   | [B, L]          | pre-merge ids: the reference's token sequence *before* cube merging, `<image>` placeholders as IMAGE_TOKEN_INDEX (-200), right-padded with the pad id |
| labels        | int32   | [B, L]          | the reference's labels for input_ids (IGNORE_INDEX = -100 where unsupervised, on placeholders and padding) |
| token_frame   | int32   | [B, L]          | video samples: f ≥ 0 on frame f's `<image>` placeholder and on the timestamp tokens `{ts_f}` that precede it; -1 elsewhere (text, the thumbnail placeholder, padding, all of an image sample) |
| token_valid   | bool    | [B, L]          | False on padding |
| timestamps    | float32 | [B, F]          | round(frame_index / FPS, 1) seconds; 0 on padded frames |
| sample_id     | int32   | [B]             | global index of the sample in the dataset (folds the per-sample Gumbel key) |

How the model rebuilds the reference sequence after cubing (SPEC §5.2): a text token with
token_frame == -1 is kept; a token with token_frame == f is kept iff frame f starts a cube; a video's
first placeholder is the thumbnail; a kept frame placeholder becomes the 64 tokens of the cube that frame
starts. Image placeholders become the 64 tokens of their crop, in order. So after `<thumbnail_end>` the
chunk `{ts_0}` carries token_frame 0 (frame 0 always starts a cube), and between frame f-1's and frame
f's placeholders the chunk `{ts_f}` carries token_frame f.

Packed layout (data.seq_buckets / data.pack_samples, `data_pipeline/packing.py`; docs/packing.md). A batch
holding `segment_ids` is packed: R = rows, P = data.pack_samples sample slots per row, T = R's text length
(data.max_text_len · P), N = the row's sequence bucket (static decoder length).

| key           | dtype   | shape              | meaning |
|---------------|---------|--------------------|---------|
| frames        | uint8   | [R, P, F, S, S, 3] | per sample slot, as above (zeros in an empty slot) |
| num_frames, modality, sample_id | int32 | [R, P] | per slot; an empty slot has modality MODALITY_EMPTY, 0 frames, sample_id -1 |
| timestamps    | float32 | [R, P, F]          | per slot |
| input_ids, labels, token_frame, token_valid | | [R, T] | the row's samples' pre-merge tokens back to back, slot 0 first |
| token_slot    | int32   | [R, T]             | the sample slot 0..P-1 a token belongs to; -1 on padding |
| sample_offset | int32   | [R, P]             | first decoder slot of each sample's merged sequence (reserved: its exact length bound) |
| segment_ids   | int32   | [R, N]             | sample slot owning each decoder slot's reservation, -1 past the last; its shape is the static N |

Each sample's merged sequence starts at its offset with positions 0, 1, ...; attention never crosses
samples; a sample's first label is never a target (the one-token shift stops at sample boundaries), so
every token of a packed row gets the logits, loss and gradients of its sample run alone.
"""

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
MODALITY_IMAGE = 0
MODALITY_VIDEO = 1
MODALITY_EMPTY = -1      # an unused sample slot of a packed row

SPECIAL_TOKENS = (
    "<patch_start>", "<patch_end>",
    "<video_start>", "<video_end>",
    "<im_start>", "<im_end>",
    "<thumbnail_start>", "<thumbnail_end>",
)

BATCH_KEYS = ("frames", "num_frames", "modality", "input_ids", "labels", "token_frame", "token_valid",
              "timestamps", "sample_id")
PACKED_KEYS = BATCH_KEYS + ("token_slot", "sample_offset", "segment_ids")
SLOT_KEYS = ("frames", "num_frames", "modality", "timestamps", "sample_id")   # [R, P, ...] when packed


def is_packed(batch) -> bool:
  return "segment_ids" in batch


def batch_keys(batch) -> tuple[str, ...]:
  """The contract keys this batch carries (BATCH_KEYS, or PACKED_KEYS for a packed batch)."""
  return PACKED_KEYS if is_packed(batch) else BATCH_KEYS


def packed_layout(data_config) -> bool:
  """True when batches use the packed layout of qv_jax/batch.py (sequence buckets or packed rows are on)."""
  return bool(tuple(data_config.seq_buckets)) or int(data_config.pack_samples) > 1


def sequence_buckets(data_config) -> tuple[int, ...]:
  """The static decoder lengths: data.seq_buckets, or (data.max_seq_len,) when only packing is on."""
  buckets = tuple(int(b) for b in data_config.seq_buckets)
  return buckets or (int(data_config.max_seq_len),)


def batch_shapes(config, batch_size: int, num_frames: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """{key: (shape, dtype name)} of a batch for `num_frames` = the bucket F."""
  d = config.data
  s, length = d.image_size, d.max_text_len
  frames_dtype = "float32" if d.normalize_on_host else "uint8"
  return {
      "frames": ((batch_size, num_frames, s, s, 3), frames_dtype),
      "num_frames": ((batch_size,), "int32"),
      "modality": ((batch_size,), "int32"),
      "input_ids": ((batch_size, length), "int32"),
      "labels": ((batch_size, length), "int32"),
      "token_frame": ((batch_size, length), "int32"),
      "token_valid": ((batch_size, length), "bool"),
      "timestamps": ((batch_size, num_frames), "float32"),
      "sample_id": ((batch_size,), "int32"),
  }


def packed_batch_shapes(config, rows: int, num_frames: int, seq_len: int
                        ) -> dict[str, tuple[tuple[int, ...], str]]:
  """{key: (shape, dtype name)} of a packed batch: `rows` rows, frame bucket F, sequence bucket N."""
  p = int(config.data.pack_samples)
  flat = batch_shapes(config, rows * p, num_frames)
  out = {}
  for k, (shape, dtype) in flat.items():
    out[k] = ((rows, p) + shape[1:], dtype) if k in SLOT_KEYS else ((rows, shape[1] * p), dtype)
  out.update(token_slot=((rows, config.data.max_text_len * p), "int32"), sample_offset=((rows, p), "int32"),
             segment_ids=((rows, seq_len), "int32"))
  return out
