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
