"""Skip counters: every bad sample is logged with its file and reason and counted, per epoch and in total.

Skips happen in the loader's worker processes; each batch carries the skip events met while it was built (see
`collate.BatchMeta`), and `SkipStats` in the main process adds them up. An epoch's report is logged once every
worker has moved past it, so it is exact with any number of workers. The state is JSON-serialisable and saved
with the iterator, so restored counts continue exactly.
"""

import collections
import dataclasses
import logging

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SkipEvent:
  """One skipped record: its epoch, global index, reason (BadSampleError.reason) and a message naming it."""
  epoch: int
  sample_id: int
  reason: str
  message: str

  def as_tuple(self) -> tuple:
    return (self.epoch, self.sample_id, self.reason, self.message)


def format_counts(counts: dict[str, int]) -> str:
  return ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items())) or "none"


class SkipStats:
  """Main-process totals of skipped samples by reason, epoch reports, and metrics for the trainer."""

  def __init__(self, num_workers: int, *, context: str = ""):
    self._num_workers = max(1, num_workers)
    self._context = context
    self.totals: collections.Counter = collections.Counter()
    self.samples = 0
    self.truncated = 0
    self._epoch_skips: dict[int, collections.Counter] = {}
    self._epoch_samples: dict[int, int] = {}
    self._worker_epoch = [0] * self._num_workers
    self.epochs_reported = 0
    self.reports: list[dict] = []  # the epoch reports logged so far by this instance

  def update(self, meta: dict) -> None:
    """Adds one batch's metadata: {"worker", "epoch", "events", "row_epochs", "truncated"}."""
    for event in meta["events"]:
      event = SkipEvent(*event)
      log.warning("skipped sample %d (%s): %s", event.sample_id, event.reason, event.message)
      self.totals[event.reason] += 1
      self._epoch_skips.setdefault(event.epoch, collections.Counter())[event.reason] += 1
    for epoch in meta["row_epochs"]:
      self._epoch_samples[epoch] = self._epoch_samples.get(epoch, 0) + 1
    self.samples += len(meta["row_epochs"])
    self.truncated += int(meta["truncated"])
    worker = int(meta["worker"]) % self._num_workers
    self._worker_epoch[worker] = max(self._worker_epoch[worker], int(meta["epoch"]))
    self._report_through(min(self._worker_epoch))

  def finish(self) -> None:
    """End of the stream: report every epoch not yet reported."""
    pending = set(self._epoch_skips) | set(self._epoch_samples)
    if pending:
      self._report_through(max(pending) + 1)

  def _report_through(self, epoch_end: int) -> None:
    while self.epochs_reported < epoch_end:
      epoch = self.epochs_reported
      skips = dict(self._epoch_skips.pop(epoch, {}))
      samples = self._epoch_samples.pop(epoch, 0)
      report = {"epoch": epoch, "samples": samples, "skipped": sum(skips.values()), "by_reason": skips}
      self.reports.append(report)
      log.info("loader %send of epoch %d: %d samples, %d skipped (%s)", self._context, epoch, samples,
               report["skipped"], format_counts(skips))
      self.epochs_reported += 1

  def metrics(self) -> dict[str, int]:
    """{"skipped/total", "skipped/<reason>", "samples", "truncated", "epochs_completed"}: cumulative."""
    out = {"skipped/total": sum(self.totals.values()), "samples": self.samples, "truncated": self.truncated,
           "epochs_completed": self.epochs_reported}
    out.update({f"skipped/{reason}": n for reason, n in sorted(self.totals.items())})
    return out

  def state(self) -> dict:
    return {
        "totals": dict(self.totals), "samples": self.samples, "truncated": self.truncated,
        "epoch_skips": [[e, dict(c)] for e, c in sorted(self._epoch_skips.items())],
        "epoch_samples": [[e, n] for e, n in sorted(self._epoch_samples.items())],
        "worker_epoch": list(self._worker_epoch), "epochs_reported": self.epochs_reported,
    }

  def load_state(self, state: dict) -> None:
    if len(state["worker_epoch"]) != self._num_workers:
      raise ValueError(f"loader state was saved with {len(state['worker_epoch'])} worker(s); this loader has "
                       f"{self._num_workers} (config field `data.num_workers` must match to resume exactly)")
    self.totals = collections.Counter({k: int(v) for k, v in state["totals"].items()})
    self.samples = int(state["samples"])
    self.truncated = int(state["truncated"])
    self._epoch_skips = {int(e): collections.Counter(c) for e, c in state["epoch_skips"]}
    self._epoch_samples = {int(e): int(n) for e, n in state["epoch_samples"]}
    self._worker_epoch = [int(e) for e in state["worker_epoch"]]
    self.epochs_reported = int(state["epochs_reported"])
