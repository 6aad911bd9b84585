"""Asking a video questions: `answer`, `answer_batch` and the multi-turn `Conversation`.

Greedy by default; sampling only when asked (temperature > 0, with top_p / top_k / seed). The reference
CLI passes no sampling arguments, so HF takes them from the checkpoint's generation_config.json (for a
Qwen2.5-Instruct lineage: sampling at T 0.7, top_p 0.8, top_k 20, repetition penalty 1.05); here nothing
is read from there.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import time
from typing import Callable, Sequence

import numpy as np

from qv_jax.infer import inputs, runner
from qv_jax.infer.types import Answer, Cube, QuestionError, Video, VideoError

DEFAULT_MAX_NEW_TOKENS = 2048   # the reference CLI's
DEFAULT_BATCH = 8
READ_THREADS = 4                # videos decoded concurrently by answer_batch (PyAV releases the GIL)


def postprocess(model, ids: Sequence[int]) -> tuple[list[int], str]:
  """(generated ids through the first terminator, the reference's answer text): ids 0 dropped (this also
  deletes "!" in Qwen's vocabulary, as the reference does), a leading BOS and the trailing terminator
  removed, decoded with special tokens kept, stripped (SPEC §9)."""
  ids = [int(t) for t in ids]
  if model.eos_id in ids:
    ids = ids[:ids.index(model.eos_id) + 1]
  kept = [t for t in ids if t != 0]
  if kept and model.bos_id is not None and kept[0] == model.bos_id:
    kept = kept[1:]
  if kept and kept[-1] == model.eos_id:
    kept = kept[:-1]
  return ids, model.tokenizer.decode(kept, skip_special_tokens=False).strip()


def cubes_of(boundary: np.ndarray, probs: np.ndarray, timestamps: Sequence[float]) -> list[Cube]:
  """The cube list of one video: boundary [F] (1.0 where a cube starts), probs [F-1], N = len(timestamps)."""
  n = len(timestamps)
  starts = [int(i) for i in np.nonzero(boundary[:n] > 0.5)[0]]
  ends = starts[1:] + [n]
  return [Cube(index=j, start_frame=s, end_frame=e, start_sec=float(timestamps[s]),
               end_sec=float(timestamps[e - 1]), boundary_prob=1.0 if s == 0 else float(probs[s - 1]))
          for j, (s, e) in enumerate(zip(starts, ends))]


def _check_settings(max_new_tokens, temperature, top_p, top_k):
  if int(max_new_tokens) < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f"bad sampling settings: temperature={temperature} (>= 0), top_p={top_p} (in (0, 1]), "
                     f"top_k={top_k} (>= 0)")


def _read(model, video, num_frames, fps):
  t0 = time.perf_counter()
  frames, timestamps = inputs.read_frames(video, image_size=int(model.config.data.image_size),
                                          num_frames=num_frames, fps=fps)
  return frames, timestamps, time.perf_counter() - t0


def _run(model, items: list[tuple[np.ndarray, list[float], list[dict]]], *, max_new_tokens, temperature, top_p,
         top_k, seed, repetition_penalty=1.0, on_step=None, batch_rows=None) -> list[Answer]:
  """Answers prepared items (frames, timestamps, turns) in one static batch of `batch_rows` rows (padded
  with copies of the first item)."""
  samples = [inputs.make_sample(f, ts, turns, tokenizer=model.tokenizer, template=model.template, sample_id=i)
             for i, (f, ts, turns) in enumerate(items)]
  rows = batch_rows or len(samples)
  samples += [dict(samples[0], sample_id=i) for i in range(len(samples), rows)]
  batch = runner.collate(model, samples)
  prepared = runner.prepare(model, batch)
  tokens, timings = runner.generate(model, prepared, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, top_k=top_k, seed=seed, repetition_penalty=repetition_penalty,
                                    on_step=on_step)
  timings = {**prepared.timings, **timings}
  out = []
  for row, (frames, ts, turns) in enumerate(items):
    ids, text = postprocess(model, tokens[row])
    out.append(Answer(
        text=text, token_ids=ids, cubes=cubes_of(prepared.boundary[row], prepared.probs[row], ts),
        timestamps=list(ts), prompt=inputs.prompt_text(turns, ts, model.template), num_frames=len(ts),
        prefill_s=timings["tower_s"] + timings["compressor_s"] + timings["prefill_s"],
        decode_s=timings["decode_s"], boundary_probs=[float(p) for p in prepared.probs[row, :len(ts) - 1]],
        timings=dict(timings)))
  return out


def answer(model, video: Video, question: str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
           num_frames: int | None = 420, fps: float = 1.0, history: Sequence[tuple[str, str]] = (),
           repetition_penalty: float = 1.0, on_text: Callable[[str], None] | None = None) -> Answer:
  """Answers one question about one video (a path, `Clip` or `Frames`). Greedy unless temperature > 0.
  `history`: earlier (question, answer) rounds about the same video, re-sent in the prompt as the
  reference does. `on_text(delta)` streams the answer text as it is generated. Raises VideoError for a
  missing or unreadable video, QuestionError for an empty question."""
  _check_settings(max_new_tokens, temperature, top_p, top_k)
  turns = inputs.conversation(question, history)
  frames, timestamps, video_s = _read(model, video, num_frames, fps)
  return _answer_frames(model, frames, timestamps, turns, video_s, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                        repetition_penalty=repetition_penalty, on_text=on_text)


def _answer_frames(model, frames, timestamps, turns, video_s, *, on_text=None, **kw) -> Answer:
  on_step = None
  if on_text is not None:
    shown = [""]

    def on_step(tokens):
      _, text = postprocess(model, tokens[0])
      if text.startswith(shown[0]) and len(text) > len(shown[0]):
        on_text(text[len(shown[0]):])
        shown[0] = text

  result = _run(model, [(frames, timestamps, turns)], on_step=on_step, **kw)[0]
  result.timings["video_s"] = video_s
  return result


def answer_batch(model, items: Sequence[tuple[Video, str]], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 num_frames: int | None = 420, fps: float = 1.0, errors: str = "raise",
                 batch_size: int = DEFAULT_BATCH, repetition_penalty: float = 1.0) -> list[Answer]:
  """Answers (video, question) pairs in static batches of `batch_size` rows (rounded up to a multiple of
  the mesh's data size; the last batch is padded), split over the data axis. Order is preserved.
  errors="return": an item whose video is missing or unreadable, or whose question is empty, gives an
  Answer with `error` set and text "" instead of raising. Videos are decoded by a few threads while
  earlier batches run."""
  if errors not in ("raise", "return"):
    raise ValueError(f"errors={errors!r}; expected 'raise' or 'return'")
  _check_settings(max_new_tokens, temperature, top_p, top_k)
  rows = runner._round_up(max(int(batch_size), 1), model.data_size)
  results: list[Answer | None] = [None] * len(items)
  pending: list[tuple[int, tuple]] = []

  def flush():
    if not pending:
      return
    answers = _run(model, [p for _, p in pending], max_new_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, top_k=top_k, seed=seed, repetition_penalty=repetition_penalty, batch_rows=rows)
    for (i, _), a in zip(pending, answers):
      results[i] = a
    pending.clear()

  def read(item):
    video, question = item
    try:
      return inputs.conversation(question), _read(model, video, num_frames, fps)
    except (VideoError, QuestionError) as e:
      return e

  workers = max(1, min(rows, os.cpu_count() or 1, READ_THREADS))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for i, got in enumerate(_bounded_map(pool, read, items, ahead=2 * rows)):
      if isinstance(got, Exception):
        if errors == "raise":
          raise got
        results[i] = Answer(text="", token_ids=[], cubes=[], timestamps=[], prompt="", num_frames=0,
                            prefill_s=0.0, decode_s=0.0, error=str(got))
        continue
      turns, (frames, timestamps, _) = got
      pending.append((i, (frames, timestamps, turns)))
      if len(pending) == rows:
        flush()
  flush()
  return results


def _bounded_map(pool, fn, items, *, ahead: int):
  """pool.map with at most `ahead` results pending (decoded videos are large)."""
  window = collections.deque()
  for item in items:
    window.append(pool.submit(fn, item))
    if len(window) >= ahead:
      yield window.popleft().result()
  while window:
    yield window.popleft().result()


class Conversation:
  """Several questions about one video. The frames are read once; every turn re-sends the earlier
  rounds in the prompt (the reference's way; the vision tower and cubing run again, deterministically
  at η = 0, and the KV cache is not reused across turns)."""

  def __init__(self, model, video: Video, *, num_frames: int | None = 420, fps: float = 1.0):
    self.model = model
    self.frames, self.timestamps, self.video_s = _read(model, video, num_frames, fps)
    self.history: list[tuple[str, str]] = []

  def ask(self, question: str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
          top_p: float = 1.0, top_k: int = 0, seed: int = 0, on_text=None) -> Answer:
    _check_settings(max_new_tokens, temperature, top_p, top_k)
    turns = inputs.conversation(question, self.history)
    result = _answer_frames(self.model, self.frames, self.timestamps, turns, self.video_s,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, on_text=on_text)
    self.history.append((question, result.text))
    return result
