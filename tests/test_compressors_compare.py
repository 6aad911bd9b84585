"""`launch.compare_compressors --quick`: every phase runs, the outputs are written, the table's numbers are
those of results.json, and a rerun reuses every finished phase."""

import json
import os

import pytest


@pytest.mark.slow
def test_quick_comparison_writes_consistent_outputs(tmp_path):
  from launch import compare_compressors, compare_report
  out = str(tmp_path / "cmp")
  # score_gating: the kind with the most phases (a converted init, stage 3, policy RL); the others answer
  # through the same path in test_compressors_infer, cubing's training is the demo's
  argv = ["--quick", "--out", out, "--kinds", "score_gating"]
  assert compare_compressors.main(argv) == 0
  for name in ("results.json", "table.md", "accuracy_vs_budget.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  results = json.load(open(os.path.join(out, "results.json")))
  rows = results["rows"]
  assert [(r["kind"], r["budget"]) for r in rows] == [("score_gating", 8), ("score_gating", 16)]
  lines = open(os.path.join(out, "table.md")).read().strip().splitlines()[2:]
  assert len(lines) == len(rows)
  keys = [k for k, _ in compare_report.COLUMNS]
  for line, row in zip(lines, rows):
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == f"`{row['kind']}`" and int(cells[1]) == row["budget"]
    for key, cell in zip(keys[2:], cells[2:]):
      if row.get(key) is None:
        assert cell == "–" and key == "boundary_f1", key
      else:
        digits = compare_report.DIGITS[key]
        assert float(cell) == pytest.approx(row[key] * compare_report.SCALE.get(key, 1.0), abs=10 ** -digits)
  for row in rows:
    assert 0 <= row["scene_accuracy"] <= 1 and row["videos"] + row["failed"] == 3
    assert row["prefill_flops"] > 0 and row["prompt_tokens"] > row["visual_tokens"] > 0
    if row["kind"] == "score_gating":
      assert row["visual_tokens"] == row["budget"]
  by = {(r["kind"], r["budget"]): r for r in rows}
  assert by["score_gating", 8]["prefill_flops"] < by["score_gating", 16]["prefill_flops"]
  phases = {(t["kind"], t["phase"]) for t in results["training"]}
  assert ("score_gating", "policy_rl") in phases and ("shared", "stage2") in phases
  # a rerun trains nothing and answers nothing again
  mtime = os.path.getmtime(os.path.join(out, "results", "score_gating_b16.json"))
  assert compare_compressors.main(argv) == 0
  assert os.path.getmtime(os.path.join(out, "results", "score_gating_b16.json")) == mtime
  again = json.load(open(os.path.join(out, "results.json")))
  assert again["rows"] == rows
