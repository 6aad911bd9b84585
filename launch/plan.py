"""Plan before the pod: compile the real train step for a TPU topology on this CPU host and report memory
per chip against HBM, FLOPs, collective traffic per mesh axis, a roofline step time, MFU and tokens/s.

  python -m launch.plan --config configs/quicksviewer.py:size=qwen2_7b,stage=3 --topology v5p:4x4x8 \
      --mesh 1,-1,1 --batch 128 --frames 420 --out plans/v5p-4x4x8
  python -m launch.plan --config ...:size=qwen2_7b,stage=3 --topology v5e:16x16 --mesh auto --jobs 2
  python -m launch.plan --config ...:size=small,stage=3 --topology v5e:2x2,v5e:2x4,v5e:4x4 \
      --sweep mesh,remat,frame_chunk --frame-chunks 8,16

Writes plan.json, plan.md (ranked table) and, for several targets, plan.png; prints the table and the
`launch/tpu_pod.sh` command of the best plan. Needs libtpu (`pip install -e '.[tpu]'`); runs on CPU only
(JAX_PLATFORMS defaults to cpu here). Numbers are compiler estimates, not measurements (docs/planner.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import runpy
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

from qv_jax.config.errors import ConfigError  # noqa: E402
from qv_jax.plan.target import canonical_topology, check_mesh_shape, parse_topology  # noqa: E402

SWEEP_DIMS = ("mesh", "remat", "frame_chunk")


def load_config(spec: str):
  """'configs/quicksviewer.py:size=qwen2_7b,stage=3' -> the config."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError("--config", f"{path!r} is not a file (expected configs/quicksviewer.py:size=...)")
  return runpy.run_path(path)["get_config"](arg or None)


def _bool(s: str) -> bool | str:
  """true / false, or a tower remat policy name (`REMAT_POLICIES`)."""
  from qv_jax.config.model import REMAT_POLICIES
  if s.lower() in REMAT_POLICIES:
    return s.lower()
  if s.lower() in ("1", "true", "yes"):
    return True
  if s.lower() in ("0", "false", "no"):
    return False
  raise ConfigError("--remat", f"{s!r}; expected true, false or one of {REMAT_POLICIES}")


def _ints(s: str, field: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in s.split(",") if x.strip())
  except ValueError:
    raise ConfigError(field, f"{s!r}; expected comma-separated integers") from None


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="configs/quicksviewer.py:size=...,stage=...")
  p.add_argument("--topology", required=True, help="e.g. v5p:4x4x8 or the accelerator type v5p-256; several, comma-separated, sweep slices")
  p.add_argument("--num-slices", type=int, default=1, help="slices joined by DCN (the data axis spans them)")
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor or data,fsdp,context,tensor (one may be -1) or 'auto'")
  p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
  p.add_argument("--frames", type=int, default=None, help="frames per video (default: the config's bucket)")
  p.add_argument("--remat", default=None, help="vision remat true|false or a policy "
                 "(model.vision.remat_policy; default: the config's)")
  p.add_argument("--frame-chunk", type=int, default=None, help="vision frame_chunk (default: the config's)")
  p.add_argument("--gather-once", action="store_true",
                 help="model.vision.gather_once: FSDP vision weights gathered once per step (docs/planner.md)")
  p.add_argument("--pack", type=int, default=None,
                 help="packed layout (docs/packing.md) with P samples per decoder row (1: sequence buckets only)")
  p.add_argument("--seq-len", type=int, default=None,
                 help="decoder length: the sequence bucket with --pack, else data.max_seq_len")
  p.add_argument("--sweep", default="", help=f"comma-separated subset of {SWEEP_DIMS}")
  p.add_argument("--frame-chunks", default="8,16,32", help="frame_chunk values a sweep tries")
  p.add_argument("--max-candidates", type=int, default=6, help="meshes tried per target by --mesh auto/sweep")
  p.add_argument("--step", default="train", choices=("train", "prefill", "decode"),
                 help="train, or the inference prefill (vision + prompt into the KV cache) / one decode step")
  p.add_argument("--new-tokens", type=int, default=256, help="prefill/decode: answer tokens the cache holds")
  p.add_argument("--param-dtype", default=None,
                 help="params' dtype (default: the config's for train, bfloat16 for prefill/decode)")
  p.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
  p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/qv_jax/plan"),
                 help="the planner's cache of compiled programs, qv_jax/plan/cache.py ('' disables)")
  p.add_argument("--out", default="plans/latest", help="output directory")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def jobs_from(args, config) -> list[dict]:
  """Every configuration to compile, checked before any compile (one ConfigError line each)."""
  sweep = [s for s in args.sweep.split(",") if s]
  bad = [s for s in sweep if s not in SWEEP_DIMS]
  if bad:
    raise ConfigError("--sweep", f"unknown {bad}; expected a subset of {SWEEP_DIMS}")
  from qv_jax.plan.candidates import mesh_candidates
  infer = args.step != "train"
  if args.pack is not None and (infer or args.pack < 1):
    raise ConfigError("--pack", f"{args.pack}: packed rows take P >= 1 samples and only --step train")
  if args.seq_len is not None and args.seq_len < 1:
    raise ConfigError("--seq-len", f"must be positive, got {args.seq_len}")
  batch = int(args.batch or (1 if infer else config.data.batch_size))
  remats = [True, False] if "remat" in sweep else [None if args.remat is None else _bool(args.remat)]
  chunks = (list(_ints(args.frame_chunks, "--frame-chunks")) if "frame_chunk" in sweep
            else [args.frame_chunk])
  out = []
  for topo in [canonical_topology(t.strip()) for t in args.topology.split(",") if t.strip()]:
    chip, dims = parse_topology(topo)
    chips = math.prod(dims) * args.num_slices
    if args.mesh == "auto" or "mesh" in sweep:
      meshes = mesh_candidates(chips, batch, num_slices=args.num_slices, grad_accum=int(config.train.grad_accum),
                               heads=int(config.model.decoder.num_kv_heads), inference=infer,
                               max_tensor=chips if infer else 8)[:args.max_candidates]
      if not meshes:
        raise ConfigError("--batch", f"global batch {batch} splits over no mesh of the {chips} chips of {topo}")
    else:
      shape = check_mesh_shape(_ints(args.mesh, "--mesh"), chips)
      shards = shape[0] * shape[1]
      if batch % shards and not infer:
        raise ConfigError("--batch", f"global batch {batch} does not split over data x fsdp = {shards} "
                                     f"(mesh {shape} on {topo})")
      meshes = [shape]
    for mesh, remat, chunk in itertools.product(meshes, remats, chunks):
      out.append(dict(topology=topo, num_slices=args.num_slices, mesh=list(mesh), batch=batch,
                      frames=args.frames, remat=remat, frame_chunk=chunk, step=args.step,
                      pack=args.pack, seq_len=args.seq_len, gather_once=args.gather_once,
                      new_tokens=args.new_tokens,
                      param_dtype=args.param_dtype or ("bfloat16" if infer else None)))
  return out


def check_loading_groups(jobs: list[dict]) -> None:
  """One line, before any compile, when no job's batch splits over its loading groups: the hosts that hold
  distinct batch rows (`qv_jax.sharding.loading_groups`; context and tensor chips on other hosts share rows,
  so a 1,64,4,2 mesh over v5p:8x8x8's 128 hosts loads 64 distinct rows). The trainer checks the same."""
  from qv_jax.plan.target import load_target, target_mesh
  from qv_jax.sharding import loading_groups
  errors = []
  for job in jobs:
    target = load_target(job["topology"], job["num_slices"])      # libtpu present, the topology loads
    groups = loading_groups(target_mesh(target, job["mesh"]), process_index=target.devices[0].process_index)[0]
    if job["batch"] % groups:
      errors.append(f"global batch {job['batch']} does not split over the {groups} loading groups (hosts "
                    f"holding distinct batch rows) of mesh {','.join(map(str, job['mesh']))} on {job['topology']}"
                    + (f" x {job['num_slices']} slices" if job["num_slices"] > 1 else ""))
  if errors and len(errors) == len(jobs):
    raise ConfigError("--batch", errors[0])


def run_one(config_spec: str, job: dict, cache_dir: str) -> dict:
  """Plans one job in this process; errors become {'error': one line}."""
  from qv_jax.plan.train_plan import apply_overrides, error_detail, plan_error, plan_train
  from qv_jax.plan.target import load_target
  try:
    from qv_jax.plan.cache import PlanCache
    cache = PlanCache(cache_dir) if cache_dir else None
    config = apply_overrides(load_config(config_spec), batch=job["batch"], frames=job["frames"],
                             remat=job["remat"], frame_chunk=job["frame_chunk"], pack=job.get("pack"),
                             seq_len=job.get("seq_len"), gather_once=job.get("gather_once") or None,
                             param_dtype=job.get("param_dtype") or None)
    target = load_target(job["topology"], job["num_slices"])
    if job.get("step", "train") != "train":
      from qv_jax.plan.infer_plan import plan_infer
      return plan_infer(config, target, job["mesh"], job["step"], new_tokens=job["new_tokens"], cache=cache)
    return plan_train(config, target, job["mesh"], cache=cache)
  except Exception as e:  # noqa: BLE001  (one line per failed configuration)
    out = dict(job, mesh_arg=",".join(map(str, job["mesh"])), error=plan_error(e))
    detail = error_detail(e)
    return dict(out, error_detail=detail) if detail else out


def run_jobs(args, jobs: list[dict]) -> list[dict]:
  if len(jobs) == 1 and args.jobs <= 1:
    return [run_one(args.config, jobs[0], args.cache_dir)]
  tmp = tempfile.mkdtemp(prefix="qv_plan_")

  def spawn(i_job):
    i, job = i_job
    path = os.path.join(tmp, f"{i}.json")
    with open(path + ".job", "w") as f:
      json.dump(job, f)
    cmd = [sys.executable, "-m", "launch.plan", "--config", args.config, "--topology", job["topology"],
           "--cache-dir", args.cache_dir, "--worker", path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode or not os.path.exists(path):
      tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
      return dict(job, mesh_arg=",".join(map(str, job["mesh"])), error=f"worker failed: {tail[:300]}")
    with open(path) as f:
      return json.load(f)

  results = []
  try:
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc="compiling", unit="config")
  except ImportError:
    bar = None
  with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
    for r in pool.map(spawn, enumerate(jobs)):
      results.append(r)
      if bar is not None:
        bar.update(1)
  if bar is not None:
    bar.close()
  return results


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    if args.worker:
      with open(args.worker + ".job") as f:
        job = json.load(f)
      with open(args.worker, "w") as f:
        json.dump(run_one(args.config, job, args.cache_dir), f, default=str)
      return 0
    config = load_config(args.config)
    jobs = jobs_from(args, config)
    if args.step == "train":
      check_loading_groups(jobs)
  except ConfigError as e:
    print(f"launch.plan: {e}", file=sys.stderr)
    return 2
  print(f"planning {len(jobs)} configuration(s) with {args.jobs} job(s) ...", file=sys.stderr)
  results = run_jobs(args, jobs)
  from qv_jax.plan import report
  title = f"Plan: {args.config.partition(':')[2] or args.config} on {args.topology}"
  paths = report.write(results, args.out, title)
  print(report.markdown(results, title))
  print("wrote " + ", ".join(paths.values()))
  ranked = report.rank(results)
  return 0 if ranked else 1


if __name__ == "__main__":
  sys.exit(main())
