"""Decode throughput: 420-frame clips (SPEC §1.1 sampling) with `data_pipeline.video.read_video`, next to the
reference's way of reading (decode every frame in order and convert every frame to RGB, as OpenCV's
`VideoCapture.read` loop does, then resize the sampled frames).

The test video is generated with PyAV (H.264, yuv420p, CRF 23, x264 "veryfast": CABAC, 3 B-frames with
B-pyramid) from synthetic camera-like content: a 1/f-textured scene panning, textured objects moving, mild sensor
noise and a scene cut every 20 s, so that keyframes cost several times a P-frame to decode, as in real footage
(pure-noise content makes keyframes unrealistically expensive). It is cached in --cache-dir. Both readers are
timed on the same decoder thread count; the frames they return are checked to be identical. When cv2 is installed
(requirements-test.txt) the reference itself is timed and checked too ("opencv_read_*"; its own FFmpeg build, so
its speed differs from the PyAV emulation). Prints one JSON object.

  python benchmarks/decode.py --quick                       # seconds: 20 s 320x180 video
  python benchmarks/decode.py                               # 7 min 1280x720 30 fps, GOPs 250 (x264 default) and 60
  python benchmarks/decode.py --gops 30,60,150,250 --threads 1,2 --repeats 3
"""

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time

import av
import numpy as np

from data_pipeline import opencv_compat
from data_pipeline.preprocess import resize_frames
from data_pipeline.video import probe_video, read_video, sample_frame_indices


def _texture(rng, height: int, width: int, alpha: float = 1.5, contrast: float = 40.0) -> np.ndarray:
  """float32 [H, W, 3] around 128 with a 1/f^alpha amplitude spectrum (natural images are near alpha 1-2)."""
  fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
  f = np.sqrt(fx ** 2 + fy ** 2)
  f[0, 0] = 1.0
  channels = []
  for _ in range(3):
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** alpha
    spectrum[0, 0] = 0
    img = np.fft.irfft2(spectrum, s=(height, width))
    channels.append(img / img.std())
  return (128 + contrast * np.stack(channels, -1)).astype(np.float32)


def make_video(path: str, *, seconds: float, width: int, height: int, rate: int, gop: int | None,
               preset: str = "veryfast", seed: int = 0) -> str:
  """Encode the synthetic camera-like clip to `path` (H.264 CRF 23): a 1/f-textured scene panning, three
  textured objects moving across it, mild sensor noise, a new scene every 20 s. gop None keeps x264's default
  (keyint 250 plus scene cuts)."""
  rng = np.random.default_rng(seed)
  tmp = path + ".part"
  container = av.open(tmp, "w", format="mp4")
  stream = container.add_stream("libx264", rate=rate)
  stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
  opts = {"preset": preset, "crf": "23"}
  if gop:
    stream.codec_context.gop_size = gop
    opts["x264-params"] = f"keyint={gop}:min-keyint={min(gop, 25)}"
  stream.options = opts
  scene = objects = None
  for i in range(int(seconds * rate)):
    if i % (20 * rate) == 0:
      scene = _texture(rng, 2 * height, 2 * width)
      objects = [(_texture(rng, height // 4, width // 6), rng.uniform(0, 1, 4)) for _ in range(3)]
    t = i / rate
    dx, dy = int(width * 0.5 * (1 + np.sin(3 * t / 7))), int(height * 0.5 * (1 + np.sin(3 * t / 11)))
    img = scene[dy:dy + height, dx:dx + width].copy()
    for obj, (x0, y0, vx, vy) in objects:
      x = int((x0 + 0.1 * vx * t) % 1 * (width - obj.shape[1]))
      y = int((y0 + 0.1 * vy * t) % 1 * (height - obj.shape[0]))
      img[y:y + obj.shape[0], x:x + obj.shape[1]] = obj
    img += rng.normal(0, 0.7, img.shape).astype(np.float32)
    frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
    for packet in stream.encode(frame):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()
  os.replace(tmp, path)
  return path


CONTENT_VERSION = 2  # bump when make_video's content changes, so cached files are regenerated


def cached_video(cache_dir: str, **kw) -> str:
  key = hashlib.sha1(json.dumps({**kw, "version": CONTENT_VERSION}, sort_keys=True).encode()).hexdigest()[:12]
  path = os.path.join(cache_dir, f"decode_bench_{kw['width']}x{kw['height']}_{key}.mp4")
  if not os.path.exists(path):
    os.makedirs(cache_dir, exist_ok=True)
    make_video(path, **kw)
  return path


def reference_read(path: str, num_frames: int, threads: int) -> np.ndarray:
  """The reference's reader with PyAV: decode every frame in order, convert every frame as OpenCV's `read` does
  (swscale to BGR24), keep the sampled ones (flipped to RGB)."""
  info = probe_video(path)
  wanted = set(sample_frame_indices(info.native_fps, info.frame_count, num_frames, 1.0))
  kept = []
  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    for index, frame in enumerate(container.decode(stream)):
      bgr = frame.to_ndarray(**opencv_compat.CONVERT_OPTIONS)
      if index in wanted:
        kept.append(bgr[..., ::-1])
      if index >= max(wanted):
        break
  return np.stack(kept)


def opencv_read(path: str, num_frames: int, threads: int) -> np.ndarray | None:
  """The reference itself (SPEC §1.1 with cv2, CAP_PROP_N_THREADS = threads); None without opencv installed."""
  try:
    import cv2
  except ImportError:
    return None
  cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, threads])
  indices = sample_frame_indices(cap.get(cv2.CAP_PROP_FPS), cap.get(cv2.CAP_PROP_FRAME_COUNT), num_frames, 1.0)
  wanted = set(indices)
  cap.set(cv2.CAP_PROP_POS_FRAMES, float(indices[0]))
  kept, number = [], indices[0]
  ok, bgr = cap.read()
  while ok and number <= indices[-1]:
    if number in wanted:
      kept.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    ok, bgr = cap.read()
    number += 1
  cap.release()
  return np.stack(kept)


def _time(fn, repeats: int) -> dict:
  walls, cpus, out = [], [], None
  for _ in range(repeats):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    walls.append(time.perf_counter() - w)
    cpus.append(time.process_time() - c)
  return {"wall_s": min(walls), "cpu_s": min(cpus), "out": out}


def gop_stats(path: str) -> dict:
  with av.open(path) as container:
    stream = container.streams.video[0]
    keys = sum(1 for p in container.demux(stream) if p.size and p.is_keyframe)
  return {"keyframes": keys, "size_mb": round(os.path.getsize(path) / 2**20, 1)}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="20 s 320x180 video, 1 repeat")
  ap.add_argument("--minutes", type=float, default=7.0)
  ap.add_argument("--width", type=int, default=1280)
  ap.add_argument("--height", type=int, default=720)
  ap.add_argument("--fps", type=int, default=30)
  ap.add_argument("--gops", default="250,60", help="comma list of keyframe intervals; 0 = x264 default")
  ap.add_argument("--preset", default="veryfast", help="x264 preset used to encode the test video")
  ap.add_argument("--num-frames", type=int, default=420)
  ap.add_argument("--image-size", type=int, default=384)
  ap.add_argument("--threads", default="1", help="comma list of decoder thread counts (= cores per worker)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--chip-period-s", type=float, default=5.0, help="one clip per chip every this many seconds")
  ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "qv_jax_bench"))
  args = ap.parse_args()
  if args.quick:
    args.minutes, args.width, args.height, args.repeats = 20 / 60, 320, 180, 1
  results = []
  for gop in [int(g) for g in args.gops.split(",")]:
    path = cached_video(args.cache_dir, seconds=args.minutes * 60, width=args.width, height=args.height,
                        rate=args.fps, gop=gop or None, preset=args.preset)
    info = probe_video(path)
    with open(path, "rb") as f:
      data = f.read()
    for threads in [int(t) for t in args.threads.split(",")]:
      kw = dict(num_frames=args.num_frames, threads=threads)
      ref_read = _time(lambda: reference_read(path, args.num_frames, threads), args.repeats)
      our_read = _time(lambda: read_video(path, resize=False, **kw), args.repeats)
      if not np.array_equal(our_read["out"].frames, ref_read["out"]):
        raise SystemExit(f"decoded frames differ from the sequential reference (gop {gop}, threads {threads})")
      cv_read = _time(lambda: opencv_read(path, args.num_frames, threads), args.repeats)
      if cv_read["out"] is not None and not np.array_equal(our_read["out"].frames, cv_read["out"]):
        raise SystemExit(f"decoded frames differ from OpenCV's (gop {gop}, threads {threads})")
      ref_clip = _time(lambda: resize_frames(reference_read(path, args.num_frames, threads), args.image_size),
                       args.repeats)
      our_clip = _time(lambda: read_video(path, image_size=args.image_size, **kw), args.repeats)
      our_bytes = _time(lambda: read_video(data, image_size=args.image_size, **kw), args.repeats)
      n = len(our_clip["out"].indices)
      clips_s = 1 / our_clip["wall_s"]
      per_core = clips_s / threads
      r3 = lambda x: round(x, 3)  # noqa: E731
      results.append({
          "gop": gop or "x264-default", **gop_stats(path), "threads": threads, "frames_per_clip": n,
          # decode + RGB only: ours vs the reference's OpenCV-style loop (every frame decoded and converted)
          "read_s": r3(our_read["wall_s"]), "reference_read_s": r3(ref_read["wall_s"]),
          "read_speedup": round(ref_read["wall_s"] / our_read["wall_s"], 2),
          "read_speedup_cpu": round(ref_read["cpu_s"] / our_read["cpu_s"], 2),
          # cv2 itself (its own FFmpeg build), when installed
          **({"opencv_read_s": r3(cv_read["wall_s"]),
              "opencv_read_speedup": round(cv_read["wall_s"] / our_read["wall_s"], 2),
              "opencv_read_speedup_cpu": round(cv_read["cpu_s"] / our_read["cpu_s"], 2)}
             if cv_read["out"] is not None else {}),
          # the full clip as the loader gets it (also resized to image_size), on both sides
          "clip_s": r3(our_clip["wall_s"]), "clip_from_bytes_s": r3(our_bytes["wall_s"]),
          "reference_clip_s": r3(ref_clip["wall_s"]),
          "clip_speedup": round(ref_clip["wall_s"] / our_clip["wall_s"], 2),
          "clip_speedup_cpu": round(ref_clip["cpu_s"] / our_clip["cpu_s"], 2),
          "clips_per_s_per_worker": r3(clips_s), "frames_per_s_per_worker": round(n * clips_s, 1),
          "clips_per_s_per_core": r3(per_core),
          "cores_per_chip": round((1 / args.chip_period_s) / per_core, 2),
      })
  print(json.dumps({
      "benchmark": "decode", "quick": args.quick,
      "video": {"seconds": args.minutes * 60, "width": args.width, "height": args.height, "fps": args.fps,
                "codec": "h264", "preset": args.preset, "native_fps": info.native_fps,
                "frame_count": info.frame_count},
      "num_frames": args.num_frames, "image_size": args.image_size, "chip_period_s": args.chip_period_s,
      "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "pyav": av.__version__},
      "results": results,
  }, indent=1))


if __name__ == "__main__":
  main()
