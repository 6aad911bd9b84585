"""Shared helpers of the tests that start local process groups (no tests here): a free loopback port and
running N commands from the repository root to completion."""

import os
import socket
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_all(cmds: list[list[str]], env: dict, timeout: float, tail: int = 3000) -> list[str]:
  """Starts every command at once in the repository root, waits for all (one still running after `timeout`
  is killed) and asserts that each exited 0, the message holding every failed one's output tail; returns
  their outputs (stdout and stderr together)."""
  procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for cmd in cmds]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=timeout)[0])
    finally:
      if p.poll() is None:
        p.kill()
  failed = [f"process {i} (exit {p.returncode}):\n{out[-tail:]}" for i, (p, out) in enumerate(zip(procs, outs))
            if p.returncode != 0]
  assert not failed, "\n\n".join(failed)
  return outs


def train_pair(workdir, flags: list[str], timeout: float = 540) -> dict:
  """`launch.train` as two local processes × 4 CPU devices over jax.distributed (tiny, stage 1, synthetic
  data, 128-token sequences) plus `flags`; returns process 0's summary (its last output line). Without the
  persistent compilation cache: with an earlier pair's executables in it, one process was seen stuck in a
  gloo all-gather that the other, compiling, joined only after gloo's 30 s timeout (loaded 2-core host)."""
  import json
  import sys
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  cmds = [[sys.executable, "-m", "launch.train", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={i}", "--cpu_devices=4", "--config", "configs/quicksviewer.py:size=tiny,stage=1",
           "--workdir", str(workdir), "--config.data.dataset_name=synthetic",
           "--config.data.max_text_len=128", "--config.data.max_seq_len=128", "--config.train.log_every=1",
           "--config.train.progress_bar=False", "--config.train.tensorboard=False",
           "--config.train.compilation_cache_dir=", *flags]
          for i in range(2)]
  outs = run_all(cmds, env=env, timeout=timeout, tail=4000)
  return json.loads(outs[0].strip().splitlines()[-1])
