"""qv-eval over two local processes (jax.distributed on loopback, records gathered through the coordination
service) gives the same predictions and metrics as one process, also when one process finishes its shard
long (> 30 s, past a device collective's rendezvous timeout) after the other."""

import json
import os
import sys

import pytest

from eval_fixtures import write_mvbench
from process_util import REPO, free_port, run_all

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SCRIPT = """
import sys, time
sys.path.insert(0, "tests")
from eval_fake import FakeModel
from qv_jax.infer.eval import cli

class Slow(FakeModel):
  def __call__(self, items):
    time.sleep(SLOW_S)
    return super().__call__(items)

slow = "--process-id" in sys.argv and sys.argv[sys.argv.index("--process-id") + 1] == "1"
sys.exit(cli.main(sys.argv[1:], answer_fn=Slow() if slow else FakeModel()))
"""
SLOW_S = 40   # process 1 answers its shard (one batch) 40 s after process 0 has finished its own


def _run(args, n):
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO)
  cluster = lambda i: ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)]
  return run_all([[sys.executable, "-c", f"SLOW_S = {SLOW_S}\n" + SCRIPT, *args, "--cpu-devices", "2", "--no-progress",
                   *(cluster(i) if n > 1 else ["--distributed", "off"])] for i in range(n)], env=env, timeout=300)


def test_two_processes_score_like_one(tmp_path):
  root = write_mvbench(tmp_path / "mvbench")
  base = ["--benchmark", "mvbench", "--data", str(root), "--checkpoint", "unused"]
  _run(base + ["--out", str(tmp_path / "one")], 1)
  outs = _run(base + ["--out", str(tmp_path / "two")], 2)
  assert '"benchmark": "mvbench"' in outs[0] and '"benchmark"' not in outs[1]   # only process 0 reports
  one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
  assert two == one and one["items"] == 5
  assert ((tmp_path / "two" / "predictions.jsonl").read_text() ==
          (tmp_path / "one" / "predictions.jsonl").read_text())
  assert sorted(os.listdir(tmp_path / "two")) == ["metrics.json", "predictions.jsonl", "run.json"]
