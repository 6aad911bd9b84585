"""Procedural scene videos with known cuts, for the CPU demo and tests.

A video lasts N whole seconds and is cut at whole seconds into a blank title card (1-3 s) and shape scenes:
a solid background (a random grey level) with one shape of a named colour, big, vivid and centred during the
scene's first second and then small, faded and off-centre (so a scene's first second is its most informative
view, as an establishing shot is). The caption lists the shape scenes in order: "red circle, then blue
square.". With 1-fps sampling (SPEC §1.1: the frame from the middle of each second) frame f shows the
scene that covers second f, so a scene starting at second c starts at sampled frame c: the true cube
boundaries are the cut seconds (the title → first scene cut included). A video has as many segments as
Quicksviewer gives it cubes (k + 1 = max(round(N/5) - 1, 1) + 1), so a perfect partition exists; segment
lengths are uniformly random compositions of N, so the uniform partition is a poor guess.

    write_dataset(out_dir, num_videos=200, seed=0)   # videos/*.mp4, train.jsonl, train_truth.json

The jsonl follows the loader's format ({"id", "video", "conversations"}); {split}_truth.json maps each id to
its length in seconds (= sampled frames), cut frames, caption and scenes.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

COLOURS = {
    "red": (220, 30, 30), "green": (30, 190, 40), "blue": (40, 60, 230), "yellow": (235, 220, 40),
    "purple": (150, 40, 200), "orange": (245, 140, 20), "cyan": (40, 210, 220), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
QUESTION = "Describe the scenes in order."
FADE_JUMP = 0.75        # after its first second a shape is 75 % faded, shrunk and drifted ...
FADE_SECONDS = 4.0      # ... and the rest over the next 4 s


@dataclasses.dataclass
class Scene:
  colour: str         # "" for the title card
  shape: str          # "" for the title card
  start: int          # first second (= first sampled frame)
  end: int            # one past the last second
  background: int     # grey level
  size: float         # shape radius at the scene's start, as a fraction of the frame
  x0: float           # centre at the start (fractions of the frame); it drifts to (x1, y1)
  y0: float
  x1: float
  y1: float

  @property
  def is_title(self) -> bool:
    return not self.shape


@dataclasses.dataclass
class SceneVideo:
  video_id: str
  seconds: int
  scenes: list[Scene]

  @property
  def cuts(self) -> list[int]:
    """Frames (= seconds) where a new scene starts, excluding frame 0."""
    return [s.start for s in self.scenes[1:]]

  @property
  def caption(self) -> str:
    return ", then ".join(f"{s.colour} {s.shape}" for s in self.scenes if not s.is_title) + "."


def num_cubes(num_frames: int, frames_per_cube: int = 5) -> int:
  return max(round(num_frames / frames_per_cube) - 1, 1) + 1


def _composition(rng, total: int, parts: int, minimum: int) -> np.ndarray:
  """`parts` lengths >= minimum summing to `total`, uniformly over all such compositions (stars and
  bars), so lengths vary widely and the uniform partition is not a good guess of the cuts."""
  slack = total - parts * minimum
  bars = np.sort(rng.choice(slack + parts - 1, size=parts - 1, replace=False))
  return minimum + np.diff(np.concatenate([[-1], bars, [slack + parts - 1]])) - 1


def random_video(rng: np.random.Generator, video_id: str, *, min_seconds: int = 12, max_seconds: int = 16,
                 min_scene: int = 2, title_seconds: tuple[int, int] = (1, 3), scenes: int | None = None,
                 frames_per_cube: int = 5) -> SceneVideo:
  """A random schedule: a blank title card (`title_seconds`, (0, 0) for none), then shape scenes; the
  segments number k + 1 (the video's cube count) unless `scenes` is given. Consecutive scenes differ
  in colour and shape."""
  seconds = int(rng.integers(min_seconds, max_seconds + 1))
  count = scenes or num_cubes(seconds, frames_per_cube)
  title = int(rng.integers(title_seconds[0], title_seconds[1] + 1)) if title_seconds[1] > 0 else 0
  shape_scenes = count - 1 if title else count
  shape_scenes = max(1, min(shape_scenes, (seconds - title) // min_scene))
  lengths = _composition(rng, seconds - title, shape_scenes, min_scene)
  starts = title + np.concatenate([[0], np.cumsum(lengths)[:-1]])
  out = []
  if title:
    out.append(Scene("", "", 0, title, int(rng.integers(60, 200)), 0.0, 0.5, 0.5, 0.5, 0.5))
  prev = None
  names = list(COLOURS)
  for start, length in zip(starts, lengths):
    while True:
      colour, shape = names[rng.integers(len(names))], SHAPES[rng.integers(len(SHAPES))]
      if prev is None or (colour != prev.colour and shape != prev.shape):
        break
    x0, y0 = rng.uniform(0.4, 0.6, size=2)
    x1, y1 = rng.choice([0.15, 0.85], size=2)
    prev = Scene(colour, shape, int(start), int(start + length), int(rng.integers(0, 90)),
                 float(rng.uniform(0.28, 0.34)), x0, y0, x1, y1)
    out.append(prev)
  return SceneVideo(video_id, seconds, out)


def render_frame(scene: Scene, seconds_in: float, size: int) -> np.ndarray:
  """uint8 [size, size, 3] of `scene` `seconds_in` seconds after it starts. A shape opens big, vivid and
  centred for one second (an establishing view), then is mostly shrunk, faded into the background and
  drifted to a corner, and slowly finishes doing so: a scene's first second shows it best."""
  img = np.full((size, size, 3), scene.background, np.float32)
  if scene.is_title:
    return img.astype(np.uint8)
  fade = 0.0 if seconds_in < 1.0 else FADE_JUMP + (1 - FADE_JUMP) * min((seconds_in - 1.0) / FADE_SECONDS, 1.0)
  cx = (scene.x0 + (scene.x1 - scene.x0) * fade) * size
  cy = (scene.y0 + (scene.y1 - scene.y0) * fade) * size
  r = scene.size * (1.0 - 0.55 * fade) * size
  alpha = 1.0 - 0.65 * fade
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  if scene.shape == "circle":
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
  elif scene.shape == "square":
    inside = (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
  else:
    inside = (yy >= cy - r) & (yy <= cy + r * 0.8) & (np.abs(xx - cx) <= (yy - (cy - r)) * 0.6)
  img[inside] = alpha * np.asarray(COLOURS[scene.colour], np.float32) + (1 - alpha) * scene.background
  return np.clip(img, 0, 255).astype(np.uint8)


def encode_video(video: SceneVideo, path: str, *, size: int = 112, fps: int = 4, codec: str = "libx264"):
  """Writes the video with PyAV (`fps` frames per second, yuv420p)."""
  import av
  with av.open(path, mode="w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
      stream.options = {"preset": "ultrafast", "crf": "18"}
    for i in range(video.seconds * fps):
      second = i / fps
      scene = next(s for s in video.scenes if s.start <= second < s.end)
      frame = av.VideoFrame.from_ndarray(render_frame(scene, second - scene.start, size), format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def conversation(video: SceneVideo) -> list[dict]:
  return [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": video.caption}]


def write_dataset(out_dir: str, *, num_videos: int, seed: int = 0, split: str = "train", size: int = 112,
                  fps: int = 4, min_seconds: int = 12, max_seconds: int = 16, frames_per_cube: int = 5
                  ) -> dict:
  """Encodes `num_videos` videos under out_dir/videos and writes out_dir/{split}.jsonl and
  out_dir/{split}_truth.json. Returns {"jsonl", "media_root", "truth", "captions"}."""
  os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
  rng = np.random.default_rng(seed)
  jsonl = os.path.join(out_dir, f"{split}.jsonl")
  truth, captions = {}, []
  with open(jsonl, "w") as f:
    for i in range(num_videos):
      vid = f"{split}_{i:05d}"
      video = random_video(rng, vid, min_seconds=min_seconds, max_seconds=max_seconds,
                           frames_per_cube=frames_per_cube)
      rel = f"videos/{vid}.mp4"
      encode_video(video, os.path.join(out_dir, rel), size=size, fps=fps)
      f.write(json.dumps({"id": vid, "video": rel, "conversations": conversation(video)}) + "\n")
      truth[vid] = {"seconds": video.seconds, "cuts": video.cuts, "caption": video.caption,
                    "scenes": [dataclasses.asdict(s) for s in video.scenes]}
      captions.append(video.caption)
  truth_path = os.path.join(out_dir, f"{split}_truth.json")
  with open(truth_path, "w") as f:
    json.dump(truth, f)
  return {"jsonl": jsonl, "media_root": out_dir, "truth": truth_path, "captions": captions}
