"""Renders docs/measurements.md from the checked-in benchmark JSON under benchmarks/results/.

  python -m benchmarks.measurements            # (re)write docs/measurements.md
  python -m benchmarks.measurements --check    # exit 1 when docs/measurements.md is not what the JSON renders

A results file `benchmarks/results/<name>.json` records one run:

  part      the section of docs/measurements.md (one of PARTS)
  title     what was run, in words
  command   the exact command that produced the numbers
  date      when it ran ("unrecorded" where the run did not say)
  machine   the machine (and its load, `load`, when recorded)
  source    only where the run's own JSON was not kept: the document the numbers were copied from
  values    name -> a number or string as the run printed it, or a reference into another checked-in JSON
            {"file": "docs/scaling/x.json", "path": "plans.0.roofline.step_s", "scale": 1, "over": {ref}}
            (a .jsonl file's path starts with its line number; `over` divides by another reference), or
            {"value": 0.676, "scale": 100} (a number the run printed, scaled for the text)
  rows      [{"what": ..., "measured": ...}]: the table rows, `str.format` templates over `values`
  readme    optional [{"what": ..., "measured": ...}]: the README's headline rows, same templates; a test
            checks that README.md holds each rendered row verbatim

The planner's compiler estimates live in docs/scaling/ with their own generated document (docs/scaling.md);
a results file here only points into them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "measurements.md"
PARTS = {
    "compressor": "Video compressor",
    "decoder": "Language decoder",
    "inference": "Inference",
    "training": "Training and checkpoints",
    "data": "Data pipeline",
    "convert": "Checkpoint conversion",
    "context": "The context axis",
    "planner": "Compiled for TPU on a CPU host (compiler estimates, not measurements)",
}
REQUIRED = ("part", "title", "command", "date", "machine", "values", "rows")


class ResultsError(ValueError):
  """A results file that does not follow the format above (the message names the file and field)."""


def _lookup(ref: dict, where: str) -> float | str:
  if "value" in ref:
    return float(ref["value"]) * float(ref.get("scale", 1.0))
  if "file" not in ref or "path" not in ref:
    raise ResultsError(f"{where}: a reference needs 'file' and 'path' (or 'value'), got {sorted(ref)}")
  path = ROOT / ref["file"]
  if not path.is_file():
    raise ResultsError(f"{where}: file {ref['file']!r} does not exist")
  keys = str(ref["path"]).split(".")
  if path.suffix == ".jsonl":
    node = json.loads(path.read_text().splitlines()[int(keys.pop(0))])
  else:
    node = json.loads(path.read_text())
  for k in keys:
    try:
      node = node[int(k)] if isinstance(node, list) else node[k]
    except (KeyError, IndexError, ValueError):
      raise ResultsError(f"{where}: {ref['file']} has no {ref['path']!r}") from None
  if isinstance(node, str):
    return node
  value = float(node) * float(ref.get("scale", 1.0))
  if "over" in ref:
    value /= float(_lookup(ref["over"], where))
  return value


def load(path: Path) -> dict:
  """One results file with its `values` resolved."""
  name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
  try:
    record = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ResultsError(f"{name}: not JSON ({e})") from None
  missing = [k for k in REQUIRED if k not in record]
  if missing:
    raise ResultsError(f"{name}: missing field(s) {', '.join(missing)}")
  if record["part"] not in PARTS:
    raise ResultsError(f"{name}: part {record['part']!r} is not one of {', '.join(PARTS)}")
  values = {k: _lookup(v, f"{name} values.{k}") if isinstance(v, dict) else v
            for k, v in record["values"].items()}
  return dict(record, file=name, resolved=values)


def load_all(results: Path = RESULTS) -> list[dict]:
  return [load(p) for p in sorted(results.glob("*.json"))]


def fill(record: dict, row: dict, field: str) -> str:
  try:
    return row[field].format(**record["resolved"])
  except (KeyError, IndexError, ValueError) as e:
    raise ResultsError(f"{record['file']}: row {row.get('what', '?')!r}: {field} template: {e!r}") from None


def readme_rows(records: list[dict]) -> list[str]:
  """The README's headline rows as the JSON renders them: `| what | measured |`."""
  return [f"| {fill(r, row, 'what')} | {fill(r, row, 'measured')} |" for r in records for row in r.get("readme", ())]


def _run(record: dict) -> str:
  busy = f"; load: {record['load']}" if record.get("load") else ""
  source = f"; numbers copied from {record['source']}" if record.get("source") else ""
  return f"- `{Path(record['file']).name}`: {record['title']}; {record['date']}, {record['machine']}{busy}{source}"


def render(records: list[dict]) -> str:
  lines = [
      "# Measurements",
      "",
      "Generated by `python -m benchmarks.measurements` from the JSON under `benchmarks/results/` (one file per",
      "run: the command, the date, the machine and its load); do not edit by hand: `--check` (run by the tests)",
      "fails when this file and the JSON disagree. A run marked *numbers copied from* a document predates the",
      "checked-in JSON: its numbers were transcribed from that document, not re-measured. The README's headline",
      "rows are rendered from the same JSON.",
      "",
      "Unless a row says otherwise the machine is the project's 2-core CPU host without an accelerator, often",
      "shared with other jobs: absolute times are rough; ratios measured side by side in one run are the",
      "numbers to read. The planner's TPU numbers are compiler estimates; the whole study, regenerated by one",
      "command, is [docs/scaling.md](scaling.md) (its JSON under [docs/scaling/](scaling/)).",
  ]
  for part, heading in PARTS.items():
    # headline runs (those the README quotes) first, then by file name
    mine = sorted((r for r in records if r["part"] == part), key=lambda r: ("readme" not in r, r["file"]))
    if not mine:
      continue
    lines += ["", f"## {heading}", "", "| what | measured | JSON | command |", "|---|---|---|---|"]
    for r in mine:
      link = f"[`{Path(r['file']).name}`](../{r['file']})"
      for row in r["rows"]:
        lines.append(f"| {fill(r, row, 'what')} | {fill(r, row, 'measured')} | {link} | `{r['command']}` |")
    lines += ["", "Runs:", ""] + [_run(r) for r in mine]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--check", action="store_true", help="fail if the document is stale, write nothing")
  p.add_argument("--results", type=Path, default=RESULTS, help="the results folder (default benchmarks/results)")
  p.add_argument("--out", type=Path, default=OUT, help="the document (default docs/measurements.md)")
  args = p.parse_args(argv)
  try:
    text = render(load_all(args.results))
  except ResultsError as e:
    print(f"benchmarks.measurements: {e}", file=sys.stderr)
    return 2
  if args.check:
    if not args.out.is_file() or args.out.read_text() != text:
      print(f"benchmarks.measurements: {args.out} is not what {args.results} renders; run "
            "`python -m benchmarks.measurements`", file=sys.stderr)
      return 1
    return 0
  args.out.write_text(text)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
