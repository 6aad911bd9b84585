"""Video decoding with PyAV: the reference's 1-fps frame sampling (SPEC §1.1), decoding only what is needed.

Frame rate and count follow OpenCV's FFmpeg backend, which the reference reads them from:
  FPS    = stream.average_rate (avg_frame_rate), else base_rate (r_frame_rate), else guessed_rate;
  FCOUNT = stream.frames (nb_frames), else floor(duration_s * FPS + 0.5), with duration_s from the container,
           else from the stream (OpenCV's get_total_frames / get_duration_sec).
A frame's index is its position in decoder output order counted from the first frame, as OpenCV's sequential
reads count it; for variable-frame-rate video that is the i-th frame, not the frame at time i/FPS. Exception, as
in the reference: after its CAP_PROP_POS_FRAMES seek to the first sampled index, OpenCV numbers frames from the
landing keyframe's timestamp, which on variable-frame-rate clips shifts every index by a constant
(`opencv_compat.seek_offset`; `opencv_seek=False` opts out).

Decoding ("gop" strategy): packets are read one GOP (keyframe to keyframe) at a time and each frame's index is its
presentation rank. A GOP holding no sampled frame is never decoded; in the others, decoding stops after the last
sampled frame, and H.264 / HEVC pictures no other picture references (nal_ref_idc = 0, single-layer sub-layer
non-reference NAL types) are dropped unless sampled. Only sampled frames are converted to RGB, exactly as OpenCV
converts them (`opencv_compat.to_rgb`: BGR24 via swscale without colour metadata), rotated upright (display matrix
or legacy `rotate` tag, as OpenCV does with CAP_PROP_ORIENTATION_AUTO; the opencv-python 4.11 wheel leaves that off
by default and returns the stored orientation) and resized. Streams this cannot index safely (missing timestamps, no
leading keyframe) fall back to decoding every frame in order and counting ("sequential"), the reference's method.
Open GOPs (leading pictures that reference the previous GOP, as x265 and MPEG-4 Part 2 B-frames make) use "scan":
one demux-only pass ranks every frame, then only the packet runs sampled frames need are decoded. Memory is bounded
by one GOP of packets (plus one small tuple per packet for "scan") and the sampled frames.
"""

import bisect
import dataclasses
import io
import math
import os

import av
import numpy as np

from data_pipeline import opencv_compat
from data_pipeline.errors import BadSampleError
from data_pipeline.preprocess import resize_image

STRATEGIES = ("auto", "gop", "scan", "sequential")


def sample_frame_indices(native_fps: float, frame_count: int, num_frames: int | None = 420, fps: float = 1.0,
                         start_sec: float | None = None, end_sec: float | None = None) -> list[int]:
  """Frame indices the reference keeps (SPEC §1.1 steps 1-4): the middle frame of each second (`round(fps)`
  frames per second in general), uniformly subsampled to at most `num_frames`; sorted and unique. Indices may
  exceed `frame_count - 1` (the reader drops those, as the reference's read loop does).

  Deviation: the reference's `range` step is round(FPS), which is 0 (a crash) for FPS < 0.5; we use 1."""
  native = float(native_fps)
  if not (native > 0 and math.isfinite(native)):
    raise ValueError(f"native_fps must be positive and finite, got {native_fps}")
  fps = min(float(fps), native)
  start_idx = round(native * start_sec) if start_sec else 0
  end_idx = round(native * end_sec) if end_sec else int(frame_count - 1)
  step = max(round(native), 1)
  per_second = round(fps)
  candidates = [int(i + j * native / fps + native / fps / 2)
                for i in range(start_idx, end_idx + 1, step) for j in range(per_second)]
  if num_frames is not None and candidates:
    gap = len(candidates) / num_frames
    candidates = [candidates[k] for k in sorted({int(k * gap + gap / 2) for k in range(num_frames)})]
  return sorted(set(candidates))


def frame_timestamps(indices, native_fps: float) -> list[float]:
  """round(i / FPS, 1) seconds for each index (SPEC §1.1 step 6)."""
  return [round(int(i) / native_fps, 1) for i in indices]


@dataclasses.dataclass
class VideoClip:
  """Sampled frames. `frames`: uint8 [N, S, S, 3] RGB (or [N, H, W, 3] upright if not resized)."""
  frames: np.ndarray
  timestamps: list[float]
  indices: list[int]
  native_fps: float
  frame_count: int


@dataclasses.dataclass
class VideoInfo:
  """What OpenCV would report for the first video stream (see the module docstring)."""
  native_fps: float
  frame_count: int
  width: int
  height: int
  codec: str
  duration_s: float


# ---------------------------------------------------------------------------------------------- opening / probing

def _name(source) -> str:
  return "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)


def _open(source):
  """(container, video stream); BadSampleError for missing / empty / unreadable / video-less input."""
  name = _name(source)
  if name == "<bytes>":
    if len(source) == 0:
      raise BadSampleError("empty_file", "video bytes are empty", name)
    target = io.BytesIO(bytes(source))
  else:
    if not os.path.exists(name):
      raise BadSampleError("missing_file", "video file does not exist", name)
    if os.path.isdir(name):
      raise BadSampleError("missing_file", "path is a directory, expected a video file", name)
    if os.path.getsize(name) == 0:
      raise BadSampleError("empty_file", "video file is empty (0 bytes)", name)
    target = name
  try:
    container = av.open(target, metadata_errors="ignore")
  except av.FFmpegError as e:
    raise BadSampleError("corrupt", f"cannot open as a media container: {e}", name) from None
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise BadSampleError("corrupt", f"cannot open: {e}", name) from None
  if not container.streams.video:
    kinds = sorted({s.type for s in container.streams}) or ["none"]
    container.close()
    raise BadSampleError("no_video_stream", f"no video stream (streams: {', '.join(kinds)})", name)
  stream = container.streams.video[0]
  ctx = stream.codec_context
  if ctx is None or not ctx.is_decoder:
    codec = ctx.name if ctx is not None else "unknown"
    container.close()
    raise BadSampleError("unsupported_codec", f"no decoder for the video stream's codec ({codec})", name)
  return container, stream


def _probe(container, stream, name) -> VideoInfo:
  rate = next((r for r in (stream.average_rate, stream.base_rate, stream.guessed_rate) if r and r > 0), None)
  if rate is None:
    raise BadSampleError("corrupt", "video stream has no frame rate", name)
  native_fps = float(rate)
  duration_s = container.duration / av.time_base if container.duration else 0.0
  if duration_s <= 0 and stream.duration and stream.time_base:
    duration_s = float(stream.duration * stream.time_base)
  frame_count = int(stream.frames) or int(math.floor(duration_s * native_fps + 0.5))
  return VideoInfo(native_fps, frame_count, stream.codec_context.width, stream.codec_context.height,
                   stream.codec_context.name, duration_s)


def probe_video(source: str | os.PathLike | bytes) -> VideoInfo:
  """Native FPS, frame count (as OpenCV reports them), size, codec and duration. Raises BadSampleError."""
  container, stream = _open(source)
  try:
    return _probe(container, stream, _name(source))
  finally:
    container.close()


# ------------------------------------------------------------------------------------ non-reference pictures

def _nal_headers(packet, length_size: int | None):
  """Yield the first two bytes of each NAL unit of a packet: length-prefixed (mp4/mkv; read in place) or Annex B
  start codes (copied)."""
  data = memoryview(packet)
  n = len(data)
  if length_size:
    i = 0
    while i + length_size < n:
      size = int.from_bytes(data[i:i + length_size], "big")
      i += length_size
      if size <= 0 or i + size > n:
        return
      yield bytes(data[i:i + 2])
      i += size
  else:
    raw = data.tobytes()
    start = raw.find(b"\x00\x00\x01")
    while start >= 0:
      yield raw[start + 3:start + 5]
      start = raw.find(b"\x00\x00\x01", start + 3)


def _droppable_fn(stream):
  """packet -> True when no other picture can reference it (safe to skip when it is not sampled), or None."""
  ctx = stream.codec_context
  extradata = bytes(ctx.extradata or b"")
  if ctx.name == "h264":
    length_size = (extradata[4] & 3) + 1 if len(extradata) > 4 and extradata[0] == 1 else None

    def droppable(packet):
      vcl = [h[0] for h in _nal_headers(packet, length_size) if h and h[0] & 0x1F in (1, 5)]
      return bool(vcl) and all((h >> 5) & 3 == 0 for h in vcl)
    return droppable
  if ctx.name == "hevc":
    if len(extradata) > 22 and extradata[0] == 1:
      length_size, layers = (extradata[21] & 3) + 1, (extradata[21] >> 3) & 7
    else:
      length_size, layers = None, 0
    if layers != 1:  # sub-layer non-reference pictures are only safe to drop in a single temporal layer
      return None

    def droppable(packet):
      vcl = [h for h in _nal_headers(packet, length_size) if len(h) == 2 and (h[0] >> 1) < 32]
      return bool(vcl) and all((h[0] >> 1) & 0x3F <= 14 and (h[0] >> 1) % 2 == 0 for h in vcl)
    return droppable
  return None


# --------------------------------------------------------------------------------------------------- decoding

class _Fallback(Exception):
  """The stream cannot be indexed by GOP; decode it sequentially instead."""


class _SeekMismatch(Exception):
  """A seek did not land where the container index said; decode by GOP without seeking."""


class _Collector:
  """Converts decoded frames whose index is sampled: RGB, upright, optionally resized."""

  def __init__(self, wanted: set[int], image_size: int | None, legacy_rotate: int):
    self.wanted, self.image_size, self.legacy_rotate = wanted, image_size, legacy_rotate
    self.frames: dict[int, np.ndarray] = {}

  def add(self, index: int, frame) -> None:
    if index not in self.wanted or index in self.frames:
      return
    rgb = opencv_compat.to_rgb(frame)
    turns = round((frame.rotation or self.legacy_rotate) / 90) % 4
    if turns:
      rgb = np.ascontiguousarray(np.rot90(rgb, turns))
    if self.image_size:
      rgb = resize_image(rgb, self.image_size)
    self.frames[index] = rgb


def _legacy_rotation(stream) -> int:
  """Counter-clockwise degrees from a legacy `rotate` tag (clockwise degrees) when there is no display matrix."""
  for key, value in stream.metadata.items():
    if key.lower() == "rotate":
      try:
        return -int(float(value))
      except ValueError:
        return 0
  return 0


SEEK_MIN_PACKETS = 90  # seek past a run of unneeded GOPs only when it is at least this many packets long
MAX_GOP_BYTES = 128 << 20  # a longer GOP (e.g. a screen recording with one keyframe) is decoded sequentially


def _send(stream, packet) -> list:
  """Decode one packet (None drains the decoder); the single place packets reach the decoder."""
  return stream.decode(packet)


class _GopReader:
  """Packets of the stream one GOP (keyframe to keyframe, decode order) at a time; can seek to a keyframe."""

  def __init__(self, container, stream):
    self.container, self.stream = container, stream
    self._restart()

  def _restart(self):
    self.packets, self.pending = self.container.demux(self.stream), None

  def next_gop(self) -> list:
    gop = [self.pending] if self.pending is not None else []
    self.pending = None
    size = sum(p.size for p in gop)
    for packet in self.packets:
      if packet.size == 0 and packet.pts is None and packet.dts is None:
        continue
      if packet.is_keyframe and gop:
        self.pending = packet
        return gop
      gop.append(packet)
      size += packet.size
      if size > MAX_GOP_BYTES:
        raise _Fallback(f"a GOP longer than {MAX_GOP_BYTES >> 20} MiB")
    return gop

  def seek(self, timestamp: int) -> None:
    self.container.seek(timestamp, stream=self.stream, backward=True)
    self._restart()


def _seek_plan(stream, wanted: set[int]):
  """From a full sample index (mp4/mov; None without one): ({first packet position: first frame index} of every
  GOP, [(position, first frame index, keyframe timestamp)] of the GOPs holding sampled frames)."""
  try:
    entries = list(stream.index_entries)
  except Exception:  # noqa: BLE001  (index access is best effort)
    return None
  if not entries or all(e.is_keyframe for e in entries) or not entries[0].is_keyframe:
    return None
  shown_before, gops = 0, []
  for pos, entry in enumerate(entries):
    if entry.is_keyframe:
      gops.append([pos, shown_before, entry.timestamp, 0])
    if not entry.is_discard:
      shown_before += 1
      gops[-1][3] += 1
  ordered = sorted(wanted)
  needed = [(pos, first, ts) for pos, first, ts, n in gops
            if bisect.bisect_left(ordered, first) < bisect.bisect_left(ordered, first + n)]
  return {pos: first for pos, first, _, _ in gops}, needed


def _decode_gop_mode(container, stream, collector: _Collector, allow_seek: bool) -> None:
  wanted = collector.wanted
  last_wanted = max(wanted)
  droppable = _droppable_fn(stream)
  seek_index = _seek_plan(stream, wanted) if allow_seek else None
  gop_starts, plan = seek_index if seek_index else ({}, [])
  next_plan = 0
  pts_to_index: dict[int, int] = {}
  last_pts = [None]

  def send(packet):
    for frame in _send(stream, packet):
      index = pts_to_index.pop(frame.pts, None)
      if index is not None:
        collector.add(index, frame)

  def process(gop, frames_before, first):
    if first and not gop[0].is_keyframe:
      raise _Fallback("stream does not start with a keyframe")
    shown = [p for p in gop if not p.is_discard]
    pts = [p.pts for p in shown]
    if any(t is None for t in pts) or len(set(pts)) != len(pts):
      raise _Fallback("missing or repeated timestamps")
    if shown and (min(pts) < gop[0].pts or (last_pts[0] is not None and min(pts) <= last_pts[0])):
      raise _Fallback("open GOP (pictures shown before their keyframe)")
    if shown:
      last_pts[0] = max(pts)
    rank = {t: frames_before + r for r, t in enumerate(sorted(pts))}
    needed = [j for j, p in enumerate(gop) if not p.is_discard and rank[p.pts] in wanted]
    for j in needed:
      pts_to_index[gop[j].pts] = rank[gop[j].pts]
    needed_set = set(needed)
    for j in range(needed[-1] + 1 if needed else 0):
      if j in needed_set or droppable is None or not droppable(gop[j]):
        send(gop[j])
    return len(shown)

  reader = _GopReader(container, stream)
  frames_before, position, first = 0, 0, True
  while frames_before <= last_wanted:
    seeked = None
    while next_plan < len(plan) and plan[next_plan][0] < position:
      next_plan += 1
    if next_plan < len(plan) and plan[next_plan][0] - position >= SEEK_MIN_PACKETS:
      seeked = plan[next_plan]
      send(None)  # drain frames still in the decoder; seeking flushes it
      reader.seek(seeked[2])
      position, frames_before, first = seeked[0], seeked[1], False
    gop = reader.next_gop()
    if not gop:
      break
    if seeked is not None and (not gop[0].is_keyframe or gop[0].dts != seeked[2]):
      raise _SeekMismatch()
    if gop_starts.get(position, frames_before) != frames_before:
      raise _SeekMismatch()  # the container index and the demuxed packets disagree: do not trust seeks
    frames_before += process(gop, frames_before, first)
    position += len(gop)
    first = False
  send(None)


def _decode_scan_mode(source, container, stream, collector: _Collector) -> None:
  """Open GOPs: rank every frame from a demux-only pass, then decode contiguous runs of packets from the GOP start
  a sampled frame needs (the previous GOP too for a leading picture) through the frame itself, dropping unsampled
  non-reference pictures."""
  wanted = collector.wanted
  droppable = _droppable_fn(stream)
  scan_container, scan_stream = _open(source)
  try:
    meta, gop_start, key_pts = [], [], []
    for packet in scan_container.demux(scan_stream):
      if packet.size == 0 and packet.pts is None and packet.dts is None:
        continue
      if packet.pts is None:
        raise _Fallback("packets without timestamps")
      if packet.is_keyframe or not meta:
        if not packet.is_keyframe:
          raise _Fallback("stream does not start with a keyframe")
        gop_start.append(len(meta))
        key_pts.append(packet.pts)
      meta.append((packet.pts, packet.is_discard, len(gop_start) - 1,
                   droppable is not None and droppable(packet)))
  finally:
    scan_container.close()
  shown = sorted(pts for pts, discard, _, _ in meta if not discard)
  if len(set(shown)) != len(shown):
    raise _Fallback("repeated timestamps")
  rank = {pts: r for r, pts in enumerate(shown)}
  runs = []
  for j, (pts, discard, gop, _) in enumerate(meta):
    if not discard and rank[pts] in wanted:
      first = gop - 1 if pts < key_pts[gop] and gop > 0 else gop
      runs.append([gop_start[first], j])
  merged = []
  for start, end in sorted(runs):
    if merged and start <= merged[-1][1] + 1:
      merged[-1][1] = max(merged[-1][1], end)
    else:
      merged.append([start, end])
  pts_to_index = {pts: rank[pts] for pts, discard, _, _ in meta if not discard and rank[pts] in wanted}
  wanted_pts = set(pts_to_index)

  def send(packet):
    for frame in _send(stream, packet):
      index = pts_to_index.pop(frame.pts, None)
      if index is not None:
        collector.add(index, frame)

  run, position = 0, 0
  for packet in container.demux(stream):
    if packet.size == 0 and packet.pts is None and packet.dts is None:
      continue
    while run < len(merged) and position > merged[run][1]:
      run += 1
    if run == len(merged):
      break
    if position >= merged[run][0] and (packet.pts in wanted_pts or not meta[position][3]):
      send(packet)
    position += 1
  send(None)


def _decode_sequential(container, stream, collector: _Collector) -> None:
  last_wanted = max(collector.wanted)
  for index, frame in enumerate(container.decode(stream)):
    collector.add(index, frame)
    if index >= last_wanted:
      break


def _decode(source, wanted: list[int], image_size: int | None, threads: int, strategy: str) -> dict[int, np.ndarray]:
  """{index: uint8 RGB frame} for the sampled indices that exist in the stream."""
  name = _name(source)
  modes = {"auto": ("gop", "gop_noseek", "scan", "sequential"), "gop": ("gop", "gop_noseek"),
           "scan": ("scan",), "sequential": ("sequential",)}[strategy]
  k = 0
  while True:
    mode = modes[k]
    container, stream = _open(source)
    try:
      stream.thread_type = "AUTO"
      stream.codec_context.thread_count = threads
      collector = _Collector(set(wanted), image_size, _legacy_rotation(stream))
      try:
        if mode == "sequential":
          _decode_sequential(container, stream, collector)
        elif mode == "scan":
          _decode_scan_mode(source, container, stream, collector)
        else:
          _decode_gop_mode(container, stream, collector, allow_seek=mode == "gop")
      except _SeekMismatch:
        k += 1
        continue
      except _Fallback as e:
        later = [m for m in ("scan", "sequential") if m in modes[k + 1:]]
        if not later:
          raise BadSampleError("corrupt", f"stream cannot be decoded with strategy {strategy!r}: {e}", name) from None
        k = modes.index(later[0])
        continue
      except av.error.EOFError:
        pass
      except av.FFmpegError as e:
        if not collector.frames:  # like OpenCV, a read error ends the clip; nothing read at all is an error
          raise BadSampleError("corrupt", f"decoding failed: {e}", name) from None
      return collector.frames
    finally:
      container.close()


def _seek_offset(source, info: VideoInfo, target: int) -> int:
  """Position minus OpenCV's frame number after the reference's `CAP_PROP_POS_FRAMES = target` seek
  (opencv_compat.seek_offset), from a demux-only pass that stops after the first keyframe past the seek time."""
  if target - 16 <= 0:
    return 0  # OpenCV seeks to the start: numbers are positions
  container, stream = _open(source)
  try:
    time_base = float(stream.time_base)
    start = stream.start_time or 0
    stamp = start + int((target - 16) / info.native_fps / time_base + 0.5)
    packets = []
    for packet in container.demux(stream):
      if packet.pts is None:
        if packet.size == 0:
          continue
        return 0  # no timestamps: OpenCV cannot seek by time either; keep positions
      seek_ts = packet.dts if packet.dts is not None else packet.pts
      if packet.is_keyframe and seek_ts > stamp and packets:
        break
      packets.append((packet.pts, packet.dts, packet.is_keyframe, not packet.is_discard))
  except av.FFmpegError:
    return 0
  finally:
    container.close()
  return opencv_compat.seek_offset(packets, target, info.native_fps, info.frame_count, start, time_base)


def read_video(source: str | os.PathLike | bytes, *, num_frames: int | None = 420, fps: float = 1.0,
               image_size: int = 384, resize: bool = True, min_frames: int = 2, threads: int = 0,
               start_sec: float | None = None, end_sec: float | None = None, strategy: str = "auto",
               opencv_seek: bool = True) -> VideoClip:
  """Decode the frames SPEC §1.1 samples from a file path or encoded bytes, upright and RGB.

  Fewer than `min_frames` frames: retry once at fps+1 (SPEC §1.1.7), then BadSampleError("too_few_frames")
  ("zero_frames" when none decode although the reported frame count covers the sampled indices). `threads`: decoder
  threads (0 = FFmpeg's choice, one per core; use 1-2 per loader worker). `strategy`: "auto" tries "gop" (streamed
  GOPs, index seeks), then "scan" (open GOPs), then "sequential" (every frame, the reference's order); naming one
  forces it (no fallback beyond it). All return identical frames. `opencv_seek` (default, the reference): index i is
  the picture OpenCV returns as frame i after seeking to the first sampled index, which on variable-frame-rate video
  can be another picture than the i-th (see opencv_compat); False: index i is always the i-th picture. Raises
  BadSampleError for any unreadable input. A video too short to hold any sampled index (e.g. one frame) reports
  "too_few_frames"."""
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy {strategy!r}; expected one of {STRATEGIES}")
  name = _name(source)
  container, stream = _open(source)
  try:
    info = _probe(container, stream, name)
  finally:
    container.close()
  size = image_size if resize else None
  attempts = [fps, fps + 1]
  frames = {}
  for rate in attempts:
    indices = sample_frame_indices(info.native_fps, info.frame_count, num_frames, rate, start_sec, end_sec)
    offset = _seek_offset(source, info, indices[0]) if indices and opencv_seek else 0
    decoded = _decode(source, [i + offset for i in indices], size, threads, strategy) if indices else {}
    frames = {position - offset: frame for position, frame in decoded.items()}
    if len(frames) >= min_frames:
      break
  too_short = info.frame_count > 0 and bool(indices) and min(indices) >= info.frame_count  # e.g. one frame
  if not frames and not too_short:
    raise BadSampleError("zero_frames", f"no frame decodes at the sampled indices (FPS {info.native_fps:.3f}, "
                         f"{info.frame_count} frames reported)", name)
  if len(frames) < min_frames:
    raise BadSampleError("too_few_frames", f"{len(frames)} frame(s) < min_frames {min_frames} even at "
                         f"fps {attempts[-1]} (video of {info.frame_count} frames at {info.native_fps:.3f} FPS)", name)
  kept = sorted(frames)
  shape = frames[kept[0]].shape
  stacked = [f if f.shape == shape else resize_image(f, (shape[1], shape[0])) for f in (frames[i] for i in kept)]
  return VideoClip(frames=np.stack(stacked), timestamps=frame_timestamps(kept, info.native_fps),
                   indices=kept, native_fps=info.native_fps, frame_count=info.frame_count)
