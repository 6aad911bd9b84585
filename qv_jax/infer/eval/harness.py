"""The evaluation loop: shard items over processes, answer in batches, append predictions as they come,
resume what a killed run left, merge on process 0, score.

The model is behind `AnswerFn` (a batch of items -> one `Outcome` per item), so the loop is tested without
one; `ModelAnswerer` wires the real `qv_jax.infer.answer_batch`. An AnswerFn with a `prepare(items)` method
(video decoding) gets it run one batch ahead in a thread and is called as `fn(items, prepared)`.
"""

import concurrent.futures
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence

from qv_jax.infer.eval import extract, metrics, store
from qv_jax.infer.eval.frames import MissingVideo, UnreadableVideo, to_api_video
from qv_jax.infer.eval.items import Item, ReadResult
from qv_jax.infer.eval.readers import mlvu, mvbench

MISSING, UNREADABLE, FAILED = "missing_video", "unreadable_video", "failed"
READ_THREADS = 4


@dataclasses.dataclass
class Outcome:
  """One item's answer: the generated text, or `error` (one line) with `kind` MISSING/UNREADABLE/FAILED."""
  text: str = ""
  error: str | None = None
  kind: str | None = None
  num_frames: int | None = None


AnswerFn = Callable[[Sequence[Item]], list[Outcome]]
Gather = Callable[[list[dict]], list[dict] | None]


class ModelAnswerer:
  """An AnswerFn over `qv_jax.infer.answer_batch` (greedy unless `sampling` says otherwise).

  `prepare(items)` decodes a batch's videos (`qv_jax.infer.inputs.read_frames`, the API's own reading, so
  the frames are those the API would read); the harness runs it for the next batch in a thread while the
  model answers this one (one extra batch of frames in memory). A missing or unreadable video becomes that
  item's error; the rest of the batch is answered. If the model raises on a batch, its items are answered one
  by one and the one that raises gets the error (the reference catches every exception per question and
  scores ""), so one bad question does not stop a benchmark."""

  def __init__(self, model, *, num_frames: int = 420, fps: float = 1.0, max_new_tokens: int = 64,
               batch_size: int = 8, **sampling):
    self.model, self.num_frames, self.fps = model, num_frames, fps
    self.kwargs = dict(max_new_tokens=max_new_tokens, num_frames=num_frames, fps=fps, errors="return",
                       batch_size=batch_size, **sampling)

  def _prepare_one(self, item: Item):
    from qv_jax.infer import Frames, VideoError
    from qv_jax.infer.inputs import read_frames
    try:
      video = to_api_video(item.video, self.num_frames, self.fps)
      frames, stamps = read_frames(video, image_size=int(self.model.config.data.image_size),
                                   num_frames=self.num_frames, fps=self.fps)
      return Frames(frames, stamps, name=item.video.path)
    except MissingVideo as e:
      return Outcome(error=f"{item.key}: {e}", kind=MISSING)
    except (UnreadableVideo, VideoError) as e:
      return Outcome(error=f"{item.key}: {e}", kind=UNREADABLE)

  def prepare(self, items: Sequence[Item]) -> list:
    """One `Frames` or error `Outcome` per item, decoded by up to READ_THREADS threads."""
    workers = max(1, min(len(items), os.cpu_count() or 1, READ_THREADS))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="eval-read") as pool:
      return list(pool.map(self._prepare_one, items))

  def _ask_each(self, pairs):
    from qv_jax.infer import answer_batch
    try:
      return answer_batch(self.model, pairs, **self.kwargs)
    except Exception as e:  # noqa: BLE001 - any model failure is recorded per question
      if len(pairs) == 1:
        return [e]
      return [a for pair in pairs for a in self._ask_each([pair])]

  def __call__(self, items: Sequence[Item], prepared: list | None = None) -> list[Outcome]:
    prepared = self.prepare(items) if prepared is None else prepared
    outcomes = [p if isinstance(p, Outcome) else None for p in prepared]
    pending = [(i, p) for i, p in enumerate(prepared) if not isinstance(p, Outcome)]
    if pending:
      answers = self._ask_each([(video, items[i].question) for i, video in pending])
      for (i, _), a in zip(pending, answers):
        if isinstance(a, Exception):
          message = " ".join(f"{type(a).__name__}: {a}".split())[:500]
          outcomes[i] = Outcome(error=f"{items[i].key}: {message}", kind=FAILED)
        elif a.error:
          outcomes[i] = Outcome(error=f"{items[i].key}: {a.error}", kind=_error_kind(items[i], a.error))
        else:
          outcomes[i] = Outcome(text=a.text, num_frames=a.num_frames)
    return outcomes


def _error_kind(item: Item, message: str) -> str:
  """The API's one-line errors name the video; a message about this item's video means it is unreadable."""
  return UNREADABLE if item.video.path in message or "video" in message.lower() else FAILED


def _record(item: Item, outcome: Outcome) -> dict:
  return {"key": item.key, "task": item.task, "variant": item.variant, "answer": item.answer,
          "output": outcome.text if outcome.error is None else "", "error": outcome.error,
          "error_kind": outcome.kind, "num_frames": outcome.num_frames, "meta": item.meta}


def _scored(item: Item, record: dict) -> dict:
  """The record with both extracted letters (recomputed from the output, so a rule change needs no rerun)."""
  out = dict(record)
  out["pred_standard"] = extract.extract_standard(record["output"], item.options)
  out["pred_reference"] = extract.extract_reference(record["output"])
  return out


def shard(items: Sequence[Item], process_index: int, process_count: int) -> list[Item]:
  """Every process_count-th item: neighbours (which share lengths) spread evenly over processes."""
  return list(items[process_index::process_count])


def answer_items(items: Sequence[Item], answer_fn: AnswerFn, out_dir: str, *, batch_size: int = 8,
                 process_index: int = 0, process_count: int = 1, progress: bool = True,
                 desc: str = "eval", retry_errors: bool = False, settings: dict | None = None) -> list[dict]:
  """Answers this process's shard of `items` not yet in out_dir's predictions (`retry_errors`: nor those
  that failed), appending each batch to its file (fsync'd) before the next; each failure is printed as one
  line. `settings` (what the answers depend on) must match those of the run that left answers there.
  Returns this process's records (old and new)."""
  from tqdm import tqdm
  os.makedirs(out_dir, exist_ok=True)
  if settings is not None:
    store.check_settings(out_dir, settings)
  done = store.read_all(out_dir)
  mine = shard(items, process_index, process_count)
  todo = [it for it in mine if it.key not in done or (retry_errors and done[it.key].get("error"))]
  appender = store.Appender(os.path.join(out_dir, store.part_name(process_index, process_count)))
  label = desc if process_count == 1 else f"{desc} [{process_index}/{process_count}]"
  if len(todo) < len(mine):
    print(f"{label}: resuming: {len(mine) - len(todo)} of {len(mine)} questions already answered, "
          f"answering {len(todo)}", file=sys.stderr, flush=True)
  bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=label, unit="q", disable=not progress,
             dynamic_ncols=True)
  batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
  prepare = getattr(answer_fn, "prepare", None)
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eval-prefetch") if prepare else None
  ahead = pool.submit(prepare, batches[0]) if pool and batches else None
  try:
    for k, batch in enumerate(batches):
      if pool:
        prepared = ahead.result()
        ahead = pool.submit(prepare, batches[k + 1]) if k + 1 < len(batches) else None
        outcomes = answer_fn(batch, prepared)
      else:
        outcomes = answer_fn(batch)
      if len(outcomes) != len(batch):
        raise RuntimeError(f"answer function returned {len(outcomes)} outcomes for {len(batch)} items")
      records = [_record(it, o) for it, o in zip(batch, outcomes)]
      appender.write(records)
      for r in records:
        if r["error"]:
          bar.write(f"{desc}: skipped ({r['error_kind']}): {r['error']}", file=sys.stderr)
      done.update((r["key"], r) for r in records)
      bar.update(len(batch))
  finally:
    if pool:
      pool.shutdown(wait=False, cancel_futures=True)
    bar.close()
    appender.close()
  return [done[it.key] for it in mine]


def _counts(records) -> dict:
  """Failed questions by kind (standard runs; the reference-input runs' failures in one count)."""
  kinds = {MISSING: 0, UNREADABLE: 0, FAILED: 0, "reference_input_errors": 0}
  examples = []
  for r in records:
    if r.get("error"):
      kind = (r.get("error_kind") or FAILED) if r["variant"] == "standard" else "reference_input_errors"
      kinds[kind] += 1
      if len(examples) < 20:
        examples.append(r["error"])
  return {**kinds, "error_examples": examples}


def score(benchmark: str, read: ReadResult, records: Sequence[dict]) -> tuple[list[dict], dict]:
  """(records in reader order with extracted letters, metrics.json content) from all records."""
  by_key = {r["key"]: r for r in records}
  missing = [it.key for it in read.items if it.key not in by_key]
  if missing:
    raise RuntimeError(f"{len(missing)} item(s) have no prediction, e.g. {missing[0]}")
  scored = [_scored(it, by_key[it.key]) for it in read.items]
  if benchmark == "videomme":
    values = metrics.videomme(scored)
  elif benchmark == "mvbench":
    values = metrics.mvbench(scored, list(mvbench.TASKS))
  elif benchmark == "mlvu":
    values = metrics.mlvu(scored, list(mlvu.TASKS))
  else:
    raise ValueError(f"unknown benchmark {benchmark!r}")
  standard = [r for r in scored if r["variant"] == "standard"]
  summary = {
    "benchmark": benchmark, "items": len(standard), "answered": sum(not r["error"] for r in standard),
    "reference_input_runs": len(scored) - len(standard), **_counts(scored),
    "skipped_samples": len(read.skipped), "skipped_examples": list(read.skipped.values())[:20],
  }
  return scored, {**summary, **values}


def evaluate(benchmark: str, read: ReadResult, answer_fn: AnswerFn, out_dir: str, *, batch_size: int = 8,
             process_index: int = 0, process_count: int = 1, gather: Gather | None = None,
             progress: bool = True, retry_errors: bool = False, settings: dict | None = None,
             extra: dict | None = None) -> dict | None:
  """Answers, merges (process 0, after `gather` collects every process's records), writes predictions.jsonl
  and metrics.json (with `settings` and `extra`); returns the metrics on process 0, None elsewhere."""
  if len({it.key for it in read.items}) != len(read.items):
    raise ValueError("benchmark items must have unique keys")
  mine = answer_items(read.items, answer_fn, out_dir, batch_size=batch_size, process_index=process_index,
                      process_count=process_count, progress=progress, desc=benchmark,
                      retry_errors=retry_errors, settings=settings)
  everything = gather(mine) if gather else mine
  if process_index != 0:
    return None
  records, values = score(benchmark, read, everything)
  store.write_merged(out_dir, records)
  values = {**values, **(settings or {}), **(extra or {})}
  with open(os.path.join(out_dir, "metrics.json.tmp"), "w") as f:
    json.dump(values, f, indent=2)
  os.replace(os.path.join(out_dir, "metrics.json.tmp"), os.path.join(out_dir, "metrics.json"))
  return values
