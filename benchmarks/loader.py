"""Loader throughput: batches/s, samples/s and frames/s of `data_pipeline.loader` per worker count, next to a
plain sequential `read_video` of the same clips (the decode cost alone), on a generated video dataset.

  python benchmarks/loader.py --quick                      # small: 6 short low-res clips, tiny shapes
  python benchmarks/loader.py --videos 16 --seconds 420 --width 640 --height 360 --rate 30 \\
      --image-size 384 --max-frames 420 --batch-size 4 --workers 0,2,4,8 --batches 12

Videos, the TFDS dataset and the tokenizer are cached under --cache (default /tmp/qv_loader_bench/<shape>).
Prints one JSON object. Timings depend on the machine; run it on a quiet one.
"""

import argparse
import fractions
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import absl.flags  # noqa: E402

absl.flags.FLAGS.mark_as_parsed()

from configs.quicksviewer import get_config  # noqa: E402
from qv_jax.config import validate  # noqa: E402
from data_pipeline import loader, tfds_builder  # noqa: E402
from data_pipeline.tokenizer import build_tiny_tokenizer  # noqa: E402
from data_pipeline.video import read_video  # noqa: E402


def write_clip(path: str, *, seconds: int, rate: int, width: int, height: int, seed: int) -> None:
  import av
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 255, (height // 8, width // 8, 3), np.uint8)
  with av.open(path, "w") as out:
    stream = out.add_stream("libx264", rate=fractions.Fraction(rate))
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"preset": "ultrafast", "crf": "28"}
    for i in range(seconds * rate):
      tile = np.roll(base, i // rate, axis=1)  # content changes once a second
      img = np.kron(tile, np.ones((8, 8, 1), np.uint8))[:height, :width]
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)


def prepare(args) -> tuple[str, str, list[str]]:
  tag = f"v{args.videos}_s{args.seconds}_{args.width}x{args.height}_r{args.rate}"
  root = os.path.join(args.cache, tag)
  media = os.path.join(root, "media")
  os.makedirs(media, exist_ok=True)
  lines, paths = [], []
  for i in range(args.videos):
    name = f"clip{i}.mp4"
    path = os.path.join(media, name)
    if not os.path.exists(path):
      write_clip(path + ".tmp.mp4", seconds=args.seconds, rate=args.rate, width=args.width, height=args.height,
                 seed=i)
      os.replace(path + ".tmp.mp4", path)
    paths.append(path)
    lines.append(json.dumps({"id": f"c{i}", "video": name, "conversations": [
        {"from": "human", "value": "<image>\nDescribe the video."}, {"from": "gpt", "value": f"Clip number {i}."}]}))
  with open(os.path.join(root, "train.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n")
  data_dir = os.path.join(root, "tfds")
  tfds_builder.build_dataset(jsonl=os.path.join(root, "train.jsonl"), media_root=media, data_dir=data_dir,
                             name="bench")
  tokenizer = os.path.join(root, "tokenizer.json")
  if not os.path.exists(tokenizer):
    build_tiny_tokenizer(lines + ["0123456789."], tokenizer)
  return data_dir, tokenizer, paths


def run_loader(config, workers: int, batches: int) -> dict:
  config = config.replace(data=dict(num_workers=workers))
  start = time.perf_counter()
  it = iter(loader.make_dataset(config, seed=0))
  try:
    first = next(it)
    t_first = time.perf_counter() - start
    frames = int(first["num_frames"].sum())
    t0 = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
      frames += int(batch["num_frames"].sum())
    elapsed = time.perf_counter() - t0
  finally:
    it.close()
  b = config.data.batch_size
  return {"workers": workers, "first_batch_s": round(t_first, 3), "batches_per_s": round(batches / elapsed, 3),
          "samples_per_s": round(batches * b / elapsed, 3),
          "frames_per_s": round((frames - int(first["num_frames"].sum())) / elapsed, 1),
          "batch_mib": round(sum(v.nbytes for v in first.values()) / 2**20, 1)}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true")
  p.add_argument("--videos", type=int, default=16)
  p.add_argument("--seconds", type=int, default=420)
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--height", type=int, default=360)
  p.add_argument("--rate", type=int, default=30)
  p.add_argument("--image-size", type=int, default=384)
  p.add_argument("--max-frames", type=int, default=420)
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--workers", default="0,2,4,8")
  p.add_argument("--batches", type=int, default=12)
  p.add_argument("--cache", default="/tmp/qv_loader_bench")
  args = p.parse_args(argv)
  if args.quick:
    args.videos, args.seconds, args.width, args.height, args.rate = 6, 12, 96, 64, 8
    args.image_size, args.max_frames, args.batch_size, args.workers, args.batches = 98, 16, 2, "0,2", 6

  data_dir, tokenizer, paths = prepare(args)
  size = "tiny" if args.image_size == 98 else "qwen2_7b"
  config = get_config(f"size={size}")
  d = config.data
  d.dataset_dir, d.dataset_name, d.tokenizer_path = data_dir, "bench", tokenizer
  d.image_size, d.max_frames, d.batch_size = args.image_size, args.max_frames, args.batch_size
  d.frame_buckets = (max(args.max_frames, 2),)
  config.model.vision.image_size = args.image_size
  config = validate(config)

  t0 = time.perf_counter()
  clip_frames = 0
  for path in paths:
    clip_frames += len(read_video(path, num_frames=args.max_frames, image_size=args.image_size).frames)
  sequential = time.perf_counter() - t0
  results = [run_loader(config, int(w), args.batches) for w in args.workers.split(",")]
  print(json.dumps({
      "benchmark": "loader", "quick": args.quick, "cpu_count": os.cpu_count(),
      "dataset": {"videos": args.videos, "seconds": args.seconds, "size": [args.width, args.height],
                  "rate": args.rate},
      "shapes": {"image_size": args.image_size, "max_frames": args.max_frames, "batch_size": args.batch_size,
                 "max_text_len": d.max_text_len},
      "sequential_read_video": {"clips_per_s": round(len(paths) / sequential, 3),
                                "frames_per_s": round(clip_frames / sequential, 1)},
      "loader": results,
  }, indent=2))


if __name__ == "__main__":
  main()
