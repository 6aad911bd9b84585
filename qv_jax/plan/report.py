"""plan.json / plan.md / plan.png and the train command for the chosen plan."""

from __future__ import annotations

import json
import os

from qv_jax.plan.target import display_name

GIB = 2 ** 30


def _mesh(r: dict) -> str:
  m = r["mesh"]
  context = f"{m['context']}," if m.get("context", 1) != 1 else ""
  return f"{m['data']},{m['fsdp']},{context}{m['tensor']}"


def rank(results: list[dict]) -> list[dict]:
  """Plans that fit, fastest predicted step first (failures and misfits dropped)."""
  ok = [r for r in results if "error" not in r and r["memory_per_chip"]["fits"]]
  return sorted(ok, key=lambda r: r["roofline"]["step_s"])


def _remat_policy(r: dict) -> str:
  """The tower's remat policy of a plan row (rows before remat_policy carry the remat bool)."""
  return r.get("remat_policy") or ("nothing_saveable" if r.get("remat", True) else "none")


def train_command(r: dict) -> str:
  """The launch/tpu_pod.sh command that trains with this plan's mesh and shapes."""
  m = r["mesh"]
  if r.get("step", "train") != "train":
    return (f"# serve {r['size']} on {r['topology']} with mesh data={m['data']} fsdp={m['fsdp']} "
            f"tensor={m['tensor']}, params in {r.get('param_dtype')}")
  extra = (f"--config.data.batch_size={r['batch']} --config.data.max_frames={r['frames']} "
           f"--config.data.frame_buckets='({r['frames']},)' --config.model.vision.remat_policy={_remat_policy(r)} "
           f"--config.model.vision.frame_chunk={r['frame_chunk']}")
  if m.get("context", 1) != 1:
    extra += f" --config.mesh.context={m['context']}"
  if r.get("pack_samples"):
    extra += f" --config.data.pack_samples={r['pack_samples']} --config.data.seq_buckets='({r['seq_len']},)'"
  return (f"TPU_NAME=<your-{r['topology'].replace(':', '-')}> ZONE=<zone> SIZE={r['size']} "
          f"MESH_DATA={m['data']} MESH_FSDP={m['fsdp']} MESH_TENSOR={m['tensor']} "
          f"bash launch/tpu_pod.sh {r['stage']} gs://<bucket>/runs/stage{r['stage']} {extra}")


def row(r: dict) -> str:
  if "error" in r:
    remat, chunk = (("config's" if r.get(k) is None else r[k]) for k in ("remat", "frame_chunk"))
    return (f"| {r.get('topology', '?')} | {r.get('mesh_arg', '?')} | {remat} | {chunk} | failed: {r['error']} "
            "| | | | | | |")
  mem = r["memory_per_chip"]
  roof = r["roofline"]
  step = "" if r.get("step", "train") == "train" else f" ({r['step']})"
  return (f"| {display_name(r['topology'])}{'' if r['num_slices'] == 1 else ' x' + str(r['num_slices'])}{step} | "
          f"{_mesh(r)} | "
          f"{r['remat']} | {r['frame_chunk']} | {mem['total_bytes'] / GIB:.2f} / {mem['hbm_bytes'] / GIB:.0f} "
          f"GiB {'fits' if mem['fits'] else '**does not fit**'} | {roof['step_s']:.3g} s | {roof['bound']} | "
          f"{100 * roof['mfu']:.1f}% | {roof['tokens_per_s_per_chip']:.0f} | "
          f"{r['collectives_per_chip']['wire_bytes_total'] / GIB:.2f} GiB | {r['compile_s']:.0f} s |")


HEADER = ("| target | mesh d,f,t | remat | frame_chunk | memory per chip | step (roofline) | bound | MFU | "
          "tokens/s/chip | collectives/chip | compile |\n|---|---|---|---|---|---|---|---|---|---|---|")


def markdown(results: list[dict], title: str) -> str:
  ranked = rank(results)
  lines = [f"# {title}", "", "Compiler estimates from XLA's TPU compiler (memory analysis, optimized HLO) and a "
           "roofline with perfect overlap: not measurements; the step time is a lower bound and MFU an upper "
           "bound.", "", HEADER]
  lines += [row(r) for r in ranked]
  rest = [r for r in results if r not in ranked]
  lines += [row(r) for r in rest]
  if ranked:
    lines += ["", "The best plan:", "", "```", train_command(ranked[0]), "```"]
  return "\n".join(lines) + "\n"


def write(results: list[dict], out: str, title: str) -> dict[str, str]:
  os.makedirs(out, exist_ok=True)
  paths = {"json": os.path.join(out, "plan.json"), "md": os.path.join(out, "plan.md")}
  ranked = rank(results)
  with open(paths["json"], "w") as f:
    json.dump({"plans": results, "best": ranked[0] if ranked else None,
               "train_command": train_command(ranked[0]) if ranked else None}, f, indent=1, default=str)
  with open(paths["md"], "w") as f:
    f.write(markdown(results, title))
  if len({(r.get("topology"), r.get("num_slices")) for r in results if "error" not in r}) > 1:
    paths["png"] = os.path.join(out, "plan.png")
    plot(results, paths["png"])
  return paths


def plot(results: list[dict], path: str, title: str = "") -> None:
  """Per chip count (best fitting plan of each target): memory per chip vs HBM, step time, MFU."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  best: dict[int, dict] = {}
  for r in results:
    if "error" in r:
      continue
    n = r["chips"]
    key = (not r["memory_per_chip"]["fits"], r["roofline"]["step_s"])
    if n not in best or key < (not best[n]["memory_per_chip"]["fits"], best[n]["roofline"]["step_s"]):
      best[n] = r
  chips = sorted(best)
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  mem = [best[n]["memory_per_chip"]["total_bytes"] / GIB for n in chips]
  hbm = [best[n]["memory_per_chip"]["hbm_bytes"] / GIB for n in chips]
  axes[0].plot(chips, mem, "o-", label="memory per chip")
  axes[0].plot(chips, hbm, "k--", label="HBM")
  axes[0].set_ylabel("GiB")
  axes[0].legend()
  axes[1].plot(chips, [best[n]["roofline"]["step_s"] for n in chips], "o-")
  axes[1].set_ylabel("predicted step (s)")
  axes[2].plot(chips, [100 * best[n]["roofline"]["mfu"] for n in chips], "o-")
  axes[2].set_ylabel("predicted MFU (%)")
  for a in axes:
    a.set_xscale("log", base=2)
    a.set_xlabel("chips")
    a.grid(alpha=0.3)
  fig.suptitle(title or "compiler estimates (roofline), best fitting mesh per chip count")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
