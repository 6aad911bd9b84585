"""Metrics: TensorBoard (tensorboardX), a tqdm progress bar and a JSON-lines file, written by process 0.

Per logged step: loss, ce, aux, eta, learning_rate, grad_norm, tokens/s, step time, achieved TFLOP/s per
device (`tflops_per_device`: the step's matmul FLOPs counted on its jaxpr with scan trip counts, see
flops.py, / devices / step time; `xla_tflops_per_device`: XLA's cost analysis of the compiled per-device
program / step time, which counts each loop body once and so undercounts scanned layers), token counts,
the loader's skip counts, and the cube-length histogram accumulated since the last log.

On resume at step S the records of steps > S (redone from the checkpoint) are dropped from
metrics.jsonl, and TensorBoard is told to purge its events from step S + 1 on, so every step appears once.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled executable from XLA's cost analysis (None when unavailable)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  (some backends do not implement it)
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return None
  flops = analysis.get("flops")
  return float(flops) if flops is not None and flops > 0 else None


class MetricsWriter:
  """Collects per-step metrics on the host and writes them every `log_every` steps."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, tensorboard: bool = True,
               progress_bar: bool = True, stage: int | None = None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.stage = stage
    self.writer = None
    self.bar = None
    self.hist = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    trim_records(self.path, start_step, stage)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                  purge_step=start_step + 1)
    if progress_bar:
      from tqdm import tqdm
      self.bar = tqdm(total=total_steps, initial=start_step, desc=f"stage {stage}" if stage else "train",
                      dynamic_ncols=True)

  def accumulate_histogram(self, hist: np.ndarray):
    self.hist = hist.astype(np.int64) if self.hist is None else self.hist + hist

  def write(self, step: int, scalars: dict[str, float], extra: dict[str, Any] | None = None):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    if self.stage is not None:
      record["stage"] = self.stage
    if self.hist is not None:
      record["cube_length_hist"] = self.hist.tolist()
    if extra:
      record.update(extra)
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.writer is not None:
      for k, v in scalars.items():
        self.writer.add_scalar(f"train/{k}", float(v), step)
      if self.hist is not None and self.hist.sum() > 0:
        lengths = np.repeat(np.arange(len(self.hist)), self.hist)
        self.writer.add_histogram("train/cube_length", lengths, step, bins=np.arange(len(self.hist) + 1) - 0.5)
      self.writer.flush()
    if self.bar is not None:
      self.bar.set_postfix({k: f"{scalars[k]:.4g}" for k in ("loss", "ce", "aux", "eta", "tokens_per_s")
                            if k in scalars}, refresh=False)
    self.hist = None

  def advance(self, n: int = 1):
    if self.bar is not None:
      self.bar.update(n)

  def close(self):
    if self.writer is not None:
      self.writer.close()
    if self.bar is not None:
      self.bar.close()


class StepTimer:
  """Wall time between consecutive completed steps (the first, compiling one, is excluded)."""

  def __init__(self):
    self.last = None
    self.times: list[float] = []

  def tick(self):
    now = time.perf_counter()
    if self.last is not None:
      self.times.append(now - self.last)
    self.last = now

  def mean_recent(self, n: int) -> float | None:
    recent = self.times[-n:]
    return float(np.mean(recent)) if recent else None


def trim_records(path: str, last_step: int, stage: int | None = None) -> int:
  """Drops the records of steps after `last_step` (of `stage`, when given) from a metrics.jsonl,
  atomically; a line that is not a JSON record (a run killed mid-write) goes too. Returns the number
  dropped."""
  if not os.path.exists(path):
    return 0
  keep, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
        ok = (not isinstance(record.get("step"), (int, float)) or record["step"] <= last_step or
              (stage is not None and record.get("stage", stage) != stage))
      except (ValueError, AttributeError):
        ok = False
      if ok:
        keep.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += bool(line.strip())
  if dropped:
    with open(path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)
  return dropped


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
