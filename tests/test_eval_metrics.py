"""Metrics on hand-worked prediction sets: the standard numbers and the reference's, per benchmark."""

import pytest

from qv_jax.infer.eval import metrics


def rec(key, task, answer, std, ref, variant="standard", **meta):
  return {"key": key, "task": task, "variant": variant, "answer": answer, "pred_standard": std,
          "pred_reference": ref, "meta": meta}


def test_videomme_every_item_counts():
  records = [
    rec("1", "Counting", "A", "A", "A", duration="short", task_type="Counting"),
    rec("2", "Counting", "B", "B", "I", duration="short", task_type="Counting"),
    rec("3", "OCR", "C", "", "", duration="medium", task_type="OCR"),          # unanswered: wrong in both
    rec("4", "OCR", "D", "D", "D", duration="medium", task_type="OCR"),
    rec("5", "Counting", "A", "B", "B", duration="long", task_type="Counting"),
    rec("6", "OCR", "B", "B", "B", duration="long", task_type="OCR"),
  ]
  m = metrics.videomme(records)
  s, r = m["standard"], m["reference"]
  assert (s["correct"], s["total"]) == (4, 6) and s["accuracy"] == pytest.approx(4 / 6)
  assert s["per_duration"] == {"long": 0.5, "medium": 0.5, "short": 1.0}
  assert s["per_task_type"] == pytest.approx({"Counting": 2 / 3, "OCR": 2 / 3})
  assert r == {"Tot": 6, "Acc": 0.5, "short_acc": 0.5, "medium_acc": 0.5, "long_acc": 0.5}


def test_videomme_reference_duration_absent_is_none():
  m = metrics.videomme([rec("1", "t", "A", "A", "A", duration="short", task_type="t")])
  assert m["reference"]["long_acc"] is None and m["reference"]["short_acc"] == 1.0


def mvbench_records():
  return [
    rec("T1/0", "T1", "A", "A", "A"),
    rec("T1/1", "T1", "A", "", ""),
    rec("T1/2", "T1", "A", "B", "B"),
    rec("T2/0", "T2", "C", "C", ""),                 # reference: empty, dropped -> T2 absent
    rec("T3/0", "T3", "D", "D", "D"),
    rec("T3/0#reference", "T3", "D", "D", "A", variant="reference"),   # the reference's own input: wrong
    rec("T3/1", "T3", "D", "D", "D"),
  ]


def test_mvbench_standard_mean_over_tasks_and_reference_micro():
  m = metrics.mvbench(mvbench_records(), ["T1", "T2", "T3"])
  s, r = m["standard"], m["reference"]
  assert s["per_task"] == pytest.approx({"T1": 1 / 3, "T2": 1.0, "T3": 1.0})
  assert s["accuracy_mean_over_tasks"] == pytest.approx((1 / 3 + 1 + 1) / 3)
  assert (s["correct"], s["total"], s["tasks"]) == (4, 6, 3)
  assert r == {"T1": 0.5, "T3": 0.5, "avg_acc": 0.5, "answered": 4}


def test_mvbench_reference_without_variants_reads_standard_records():
  records = [r for r in mvbench_records() if r["variant"] == "standard"]
  assert metrics.mvbench(records, ["T1", "T2", "T3"])["reference"]["T3"] == 1.0


def test_mlvu_m_avg_is_a_task_mean_reference_is_micro():
  records = [rec("a/0", "a", "A", "A", "A"),
             rec("b/0", "b", "B", "B", "B"), rec("b/1", "b", "B", "C", "C"), rec("b/2", "b", "A", "C", "C")]
  m = metrics.mlvu(records, ["a", "b"])
  assert m["standard"]["M-Avg"] == pytest.approx((1 + 1 / 3) / 2)
  assert m["reference"]["avg_acc"] == pytest.approx(2 / 4)
  assert m["reference"]["b"] == pytest.approx(1 / 3)


def test_no_answered_items_gives_none_not_a_crash():
  m = metrics.mlvu([rec("a/0", "a", "A", "", "")], ["a"])
  assert m["reference"]["avg_acc"] is None and m["standard"]["M-Avg"] == 0.0
