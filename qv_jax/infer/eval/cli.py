"""qv-eval: score a checkpoint on Video-MME, MVBench or MLVU in their published layouts.

  qv-eval --benchmark videomme --data Video-MME --checkpoint ckpt/quicksviewer-8b --out runs/videomme

Writes OUT/predictions.jsonl as it goes (rerun the same command to resume a killed run) and OUT/metrics.json
(standard and reference-style numbers side by side). Multi-host: run the same command on every host
(`--distributed auto` joins a TPU pod / SLURM cluster; `--coordinator` etc. for explicit clusters); each
process answers every P-th item on its own devices, process 0 merges and scores. See docs/evaluation.md.
"""

import argparse
import json
import sys

from qv_jax.infer.eval import distributed
from qv_jax.infer.eval.harness import ModelAnswerer, evaluate
from qv_jax.infer.eval.items import BenchmarkError, ReadResult
from qv_jax.infer.eval.readers import mlvu, mvbench, videomme


def parse_args(argv):
  p = argparse.ArgumentParser(prog="qv-eval", description=__doc__.split("\n\n")[0])
  p.add_argument("--benchmark", required=True, choices=["videomme", "mvbench", "mlvu"])
  p.add_argument("--data", required=True, help="the benchmark's root folder, as released")
  p.add_argument("--checkpoint", required=True, help="a qv-convert output or a training work directory")
  p.add_argument("--out", required=True, help="output folder (predictions.jsonl, metrics.json)")
  p.add_argument("--video-dir", help="Video-MME: folder of {videoID}.mp4 (default: DATA/data or DATA/video_mme_video)")
  p.add_argument("--num-frames", type=int, default=420, help="frames per video (reference: 420)")
  p.add_argument("--fps", type=float, default=1.0, help="sampling rate (reference: 1)")
  p.add_argument("--max-new-tokens", type=int, default=64,
                 help="answer length cap (the reference allows 2048; the prompts ask for a letter)")
  p.add_argument("--batch-size", type=int, default=8, help="questions per answer_batch call")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-reference-inputs", dest="reference_inputs", action="store_false",
                 help="MVBench: do not also answer bounded questions with start/end ignored (the reference's "
                      "inputs); its numbers then reuse the standard answers")
  p.add_argument("--retry-errors", action="store_true",
                 help="on resume, answer again the questions that failed (e.g. a video added since)")
  p.add_argument("--limit", type=int, default=None, help="only the first N questions (smoke runs)")
  p.add_argument("--mesh", default="auto",
                 help="data,fsdp,tensor sizes over this process's own devices, e.g. 1,-1,1 (one size may be -1: "
                      "the rest; all fixed: the first data*fsdp*tensor devices; auto: the loader's default)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                 help="compute and param dtype (default: the checkpoint config's)")
  p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's, or the config's)")
  p.add_argument("--no-progress", dest="progress", action="store_false")
  p.add_argument("--distributed", choices=["auto", "on", "off"], default="auto")
  p.add_argument("--coordinator", help="host:port of process 0 (explicit clusters)")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)
  p.add_argument("--cpu-devices", type=int, help="simulate this many CPU devices (tests)")
  args = p.parse_args(argv)
  for name in ("num_frames", "batch_size", "max_new_tokens"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.fps <= 0:
    p.error("--fps must be > 0")
  return args


def read_benchmark(args) -> ReadResult:
  if args.benchmark == "videomme":
    read = videomme.read(args.data, video_dir=args.video_dir)
  elif args.benchmark == "mvbench":
    read = mvbench.read(args.data, reference_inputs=args.reference_inputs, fps=args.fps)
  else:
    read = mlvu.read(args.data)
  if args.limit is not None:
    keep = set([it.key for it in read.items if it.variant == "standard"][:args.limit])
    read.items = [it for it in read.items if it.key.removesuffix("#reference") in keep]
  if not read.items:
    raise BenchmarkError(f"{args.data}: no usable questions ({len(read.skipped)} skipped)")
  return read


def _mesh(spec: str):
  import jax
  from qv_jax.sharding import make_mesh
  if spec == "auto":
    return None
  try:
    data, fsdp, tensor = (int(x) for x in spec.split(","))
  except ValueError:
    raise ValueError(f"--mesh: expected three comma-separated sizes data,fsdp,tensor, got {spec!r}") from None
  devices = jax.local_devices()
  if min(data, fsdp, tensor) > 0:
    devices = devices[:data * fsdp * tensor]
  return make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor}, devices)


def _answer_fn(args):
  from qv_jax.infer import load
  model = load(args.checkpoint, mesh=_mesh(args.mesh), dtype=args.dtype, tokenizer=args.tokenizer)
  return ModelAnswerer(model, num_frames=args.num_frames, fps=args.fps, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, seed=args.seed)


def settings(args) -> dict:
  """What the answers depend on: a resumed run must use the same (OUT/run.json)."""
  import os
  return {"benchmark": args.benchmark, "checkpoint": os.path.abspath(args.checkpoint), "num_frames": args.num_frames,
          "fps": args.fps, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
          "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed, "dtype": args.dtype,
          "tokenizer": args.tokenizer, "reference_inputs": args.reference_inputs}


def main(argv=None, answer_fn=None) -> int:
  """`answer_fn` replaces the model (tests)."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.cpu_devices:
    import os
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
    os.environ.setdefault("PJRT_NPROC", "256")   # simulated devices' collectives: docs/context.md
  try:
    distributed.initialize(args.distributed, args.coordinator, args.num_processes, args.process_id)
    import jax
    read = read_benchmark(args)
    fn = answer_fn or _answer_fn(args)
    values = evaluate(args.benchmark, read, fn, args.out, batch_size=args.batch_size,
                      process_index=jax.process_index(), process_count=jax.process_count(),
                      gather=distributed.gather_records, progress=args.progress,
                      retry_errors=args.retry_errors, settings=settings(args), extra={"limit": args.limit})
  except (BenchmarkError, ValueError, FileNotFoundError) as e:
    print(f"qv-eval: error: {e}", file=sys.stderr)
    return 2
  if values is not None:
    print(json.dumps({k: values[k] for k in ("benchmark", "items", "answered", "missing_video",
                                             "unreadable_video", "failed", "standard", "reference")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
