"""Metrics from prediction records, the benchmarks' standard way and the reference's way (SPEC §10).

A record is a dict with `task`, `variant`, `answer` (letter), `pred_standard`, `pred_reference` (letters, ""
when none was extracted or the item was not answered) and `meta`. Standard metrics count every item
(unanswered = wrong) and average tasks as each benchmark publishes them; the reference's numbers drop empty
predictions (MVBench, MLVU), use a micro average, and read MVBench's "reference" variants when present.
"""

from collections import defaultdict

VIDEOMME_DURATIONS = ("short", "medium", "long")


def _ratio(correct, total):
  return correct / total if total else None


def _by(records, group, pred_field, drop_empty=False, lower=False):
  """{group: (correct, total)} over records; `drop_empty` skips empty predictions as the reference does."""
  counts = defaultdict(lambda: [0, 0])
  for r in records:
    pred, truth = r[pred_field], r["answer"]
    if drop_empty and pred == "":
      continue
    if lower:
      pred, truth = pred.lower(), truth.lower()
    c = counts[group(r)]
    c[0] += int(pred == truth)
    c[1] += 1
  return dict(counts)


def _accs(counts):
  return {k: _ratio(*v) for k, v in counts.items()}


def split_variants(records):
  """(standard records, records the reference metrics read: its own variant where one exists)."""
  standard = [r for r in records if r["variant"] == "standard"]
  ref_keys = {r["key"].removesuffix("#reference"): r for r in records if r["variant"] == "reference"}
  reference = [ref_keys.get(r["key"], r) for r in standard]
  return standard, reference


def videomme(records) -> dict:
  standard, _ = split_variants(records)
  total = _by(standard, lambda r: 0, "pred_standard").get(0, (0, 0))
  ref_total = _by(standard, lambda r: 0, "pred_reference", lower=True).get(0, (0, 0))
  ref_dur = _by(standard, lambda r: r["meta"]["duration"], "pred_reference", lower=True)
  return {
    "standard": {
      "accuracy": _ratio(*total), "correct": total[0], "total": total[1],
      "per_duration": {d: _ratio(*c) for d, c in sorted(_by(standard, lambda r: r["meta"]["duration"],
                                                           "pred_standard").items())},
      "per_task_type": dict(sorted(_accs(_by(standard, lambda r: r["meta"]["task_type"], "pred_standard")).items())),
    },
    "reference": {
      "Tot": ref_total[1], "Acc": _ratio(*ref_total),
      **{f"{d}_acc": _ratio(*ref_dur[d]) if d in ref_dur else None for d in VIDEOMME_DURATIONS},
    },
  }


def _task_mean(records, tasks) -> dict:
  counts = _by(records, lambda r: r["task"], "pred_standard")
  per_task = {t: _ratio(*counts[t]) for t in tasks if t in counts}
  values = [v for v in per_task.values() if v is not None]
  return {"per_task": per_task, "tasks": len(per_task), "total": sum(c[1] for c in counts.values()),
          "correct": sum(c[0] for c in counts.values()), "mean": sum(values) / len(values) if values else None}


def _reference_micro(records, tasks) -> dict:
  counts = _by(records, lambda r: r["task"], "pred_reference", drop_empty=True)
  out = {t: _ratio(*counts[t]) for t in tasks if t in counts}
  out["avg_acc"] = _ratio(sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values()))
  out["answered"] = sum(c[1] for c in counts.values())
  return out


def mvbench(records, tasks) -> dict:
  standard, reference = split_variants(records)
  mean = _task_mean(standard, tasks)
  return {"standard": {"accuracy_mean_over_tasks": mean.pop("mean"), **mean},
          "reference": _reference_micro(reference, tasks)}


def mlvu(records, tasks) -> dict:
  standard, reference = split_variants(records)
  mean = _task_mean(standard, tasks)
  return {"standard": {"M-Avg": mean.pop("mean"), **mean}, "reference": _reference_micro(reference, tasks)}
