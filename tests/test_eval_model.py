"""qv-eval end to end with a tiny random Quicksviewer (a training work directory): each benchmark fixture
through the real `answer_batch`; a run killed with SIGKILL and resumed gives the same predictions.jsonl as one
uninterrupted run, answering nothing twice; two jax.distributed processes give the same metrics as one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from eval_fixtures import write_mlvu, write_mvbench, write_videomme
from infer_fixtures import make_workdir
from process_util import free_port, run_all
from test_train_util import CACHE_DIR
from qv_jax.infer.eval import cli
from qv_jax.infer.eval.extract import extract_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRITERS = {"videomme": write_videomme, "mvbench": write_mvbench, "mlvu": write_mlvu}
FAST = ["--num-frames", "8", "--max-new-tokens", "3", "--batch-size", "2", "--no-progress", "--mesh", "1,1,1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return make_workdir(str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def mvbench_root(tmp_path_factory):
  return write_mvbench(tmp_path_factory.mktemp("mvbench"))


def lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("bench", ["videomme", "mvbench", "mlvu"])
def test_each_benchmark_through_the_model(workdir, tmp_path, bench):
  root = WRITERS[bench](tmp_path / "data")
  out = tmp_path / "out"
  assert cli.main(["--benchmark", bench, "--data", str(root), "--checkpoint", workdir, "--out", str(out), *FAST]) == 0
  records = lines(out / "predictions.jsonl")
  values = json.loads((out / "metrics.json").read_text())
  unreadable = 1 if bench == "mlvu" else 0            # MLVU's fixture has a corrupt file
  assert (values["missing_video"], values["unreadable_video"], values["failed"]) == (1, unreadable, 0)
  answered = [r for r in records if not r["error"]]
  assert len(answered) == len(records) - 1 - unreadable and all(isinstance(r["output"], str) for r in answered)
  assert all(r["pred_reference"] == extract_reference(r["output"]) for r in records)
  assert all(1 < r["num_frames"] <= 8 for r in answered)
  if bench == "mvbench":
    by_key = {r["key"]: r for r in records}
    assert by_key["action_sequence/0"]["num_frames"] == 4                # 2 s .. 5 s of an 8 s video
    assert by_key["action_sequence/0#reference"]["num_frames"] == 8      # start/end ignored
    assert by_key["episodic_reasoning/0"]["num_frames"] == 6


def _cmd(root, workdir, out, *extra):
  return [sys.executable, "-m", "qv_jax.infer.eval.cli", "--benchmark", "mvbench", "--data", str(root),
          "--checkpoint", workdir, "--out", str(out), *FAST, "--batch-size", "1", *extra]


def _env():
  """One CPU device per process; compiled programs shared through the tests' persistent cache."""
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1",
              JAX_COMPILATION_CACHE_DIR=CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


@pytest.fixture(scope="module")
def mvbench_whole(workdir, mvbench_root, tmp_path_factory):
  """One uninterrupted single-process run, one question per batch: what the other runs must reproduce."""
  out = tmp_path_factory.mktemp("whole")
  subprocess.run(_cmd(mvbench_root, workdir, out, "--distributed", "off"), cwd=REPO, env=_env(), check=True,
                 capture_output=True, timeout=300)
  return out


@pytest.mark.slow
def test_sigkill_then_resume_equals_one_run(workdir, mvbench_root, mvbench_whole, tmp_path):
  run = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(mvbench_root, workdir, run, "--distributed", "off"), cwd=REPO, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  path = run / "predictions.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if path.exists() and path.read_text().count("\n") >= 3:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = path.read_text().count("\n")
  assert 3 <= done < 8, "the run finished before it could be killed"
  resumed = subprocess.run(_cmd(mvbench_root, workdir, run, "--distributed", "off"), cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming: {done} of 8 questions already answered, answering {8 - done}" in resumed.stderr
  assert path.read_bytes() == (mvbench_whole / "predictions.jsonl").read_bytes()
  assert (run / "metrics.json").read_text() == (mvbench_whole / "metrics.json").read_text()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_score_like_one(workdir, mvbench_root, mvbench_whole, tmp_path):
  port = free_port()
  two = tmp_path / "two"
  outs = run_all([_cmd(mvbench_root, workdir, two, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                       "--process-id", str(i)) for i in range(2)], env=_env(), timeout=300)
  assert '"benchmark": "mvbench"' in outs[0] and '"benchmark"' not in outs[1]   # process 0 reports
  assert json.loads((two / "metrics.json").read_text()) == json.loads((mvbench_whole / "metrics.json").read_text())
  assert (two / "predictions.jsonl").read_text() == (mvbench_whole / "predictions.jsonl").read_text()
