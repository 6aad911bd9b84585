"""The outputs of `launch.compare_compressors`: results.json, table.md (the rows of results.json, rounded
as `cell` rounds them) and accuracy_vs_budget.png (answer accuracy against the measured visual tokens, one
line per kind)."""

from __future__ import annotations

import json
import os

COLUMNS = (("kind", "kind"), ("budget", "B"), ("visual_tokens", "visual tokens / video"),
           ("prompt_tokens", "prompt tokens"), ("exact_match", "exact caption"),
           ("scene_accuracy", "scene accuracy"), ("boundary_f1", "boundary F1 (±1)"),
           ("prefill_flops", "prefill MFLOP"), ("prefill_s", "prefill ms"), ("compressor_s", "compressor ms"))
SCALE = {"prefill_flops": 1e-6, "prefill_s": 1e3, "compressor_s": 1e3}
DIGITS = {"visual_tokens": 1, "prompt_tokens": 1, "exact_match": 3, "scene_accuracy": 3, "boundary_f1": 3,
          "prefill_flops": 2, "prefill_s": 2, "compressor_s": 1}


def cell(row: dict, key: str) -> str:
  value = row.get(key)
  if value is None:
    return "–"
  if key in DIGITS:
    return f"{float(value) * SCALE.get(key, 1.0):.{DIGITS[key]}f}"
  return f"`{value}`" if key == "kind" else str(value)


def table(rows: list[dict], budgets=None) -> str:
  """Markdown rows of `rows` (only budgets in `budgets` when given)."""
  lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for r in rows:
    if budgets is None or r["budget"] in budgets:
      lines.append("| " + " | ".join(cell(r, key) for key, _ in COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for kind in dict.fromkeys(r["kind"] for r in rows):
    mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["visual_tokens"])
    x = [r["visual_tokens"] for r in mine]
    for ax, key in zip(axes, ("scene_accuracy", "exact_match")):
      ax.plot(x, [r[key] for r in mine], marker="o", label=kind)
  for ax, title in zip(axes, ("per-scene accuracy", "exact-caption accuracy")):
    ax.set_xlabel("visual tokens per video (measured)")
    ax.set_ylabel(title)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle("held-out scene videos: accuracy against visual-token budget")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(out: str, results: dict) -> None:
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(table(results["rows"]))
  plot(results["rows"], os.path.join(out, "accuracy_vs_budget.png"))
