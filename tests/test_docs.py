"""The documentation: docs/measurements.md is what benchmarks/results/ renders, the README's headline
numbers are the JSON's, and every relative link in README.md and docs/*.md stays inside the repository."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks import measurements

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# [text](target), ![alt](target), [name]: target, src="target", href="target"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)|"
                  r"(?:src|href)=\"([^\"]+)\"", re.M)


def test_measurements_doc_is_what_the_json_renders():
  out = subprocess.run([sys.executable, "-m", "benchmarks.measurements", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  text = (ROOT / "docs" / "measurements.md").read_text()
  for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
    assert f"(../benchmarks/results/{path.name})" in text, path.name


def test_check_fails_when_a_number_changes_and_names_a_bad_file(tmp_path, capsys):
  results = tmp_path / "results"
  shutil.copytree(ROOT / "benchmarks" / "results", results)
  doc = tmp_path / "measurements.md"
  assert measurements.main(["--results", str(results), "--out", str(doc)]) == 0
  assert measurements.main(["--check", "--results", str(results), "--out", str(doc)]) == 0
  record = json.loads((results / "train_step.json").read_text())
  record["values"]["tiny_ms"] += 1
  (results / "train_step.json").write_text(json.dumps(record))
  assert measurements.main(["--check", "--results", str(results), "--out", str(doc)]) == 1
  del record["command"]
  (results / "train_step.json").write_text(json.dumps(record))
  assert measurements.main(["--check", "--results", str(results), "--out", str(doc)]) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "train_step.json" in err and "command" in err


def test_readme_headline_rows_are_the_json_rendered():
  """Every row of the README's measured tables comes from benchmarks/results/, and every headline there is
  in the README, verbatim."""
  readme = (ROOT / "README.md").read_text()
  section = readme[readme.index("\n## Measured"):readme.index("\n## What is guaranteed")]
  rows = [l for l in section.splitlines() if l.startswith("| ") and not l.startswith(("| what |", "| kind |"))]
  rendered = measurements.readme_rows(measurements.load_all())
  assert len(rendered) == len(set(rendered)) >= 15
  assert sorted(rows) == sorted(rendered)


def test_planner_rows_read_the_planner_json():
  """A headline from the scaling study follows its JSON, not a copy."""
  record = measurements.load(ROOT / "benchmarks" / "results" / "plan_released.json")
  plan = json.loads((ROOT / "docs/scaling/qwen2_7b_v5p-4x4x8_b128_train_pack1_seq_len7168_m1x128x1x1.json").read_text())["plans"][0]
  assert record["resolved"]["train_gib"] == plan["memory_per_chip"]["total_bytes"] / 2 ** 30
  assert record["resolved"]["train_step_s"] == plan["roofline"]["step_s"]


def test_relative_links_resolve_inside_the_repository():
  bad = []
  for doc in DOCS:
    text = doc.read_text()
    for m in LINK.finditer(text):
      target = next(g for g in m.groups() if g)
      if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
        continue
      path = (doc.parent / target.split("#")[0]).resolve()
      if not path.is_relative_to(ROOT) or not path.exists():
        bad.append(f"{doc.relative_to(ROOT)}: {target}")
    if "../shared" in text:
      bad.append(f"{doc.relative_to(ROOT)}: mentions ../shared (outside a fresh clone)")
  assert not bad, bad
