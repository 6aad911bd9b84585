"""Killing a run and resuming it gives the losses of an uninterrupted run: a clean stop (`train.stop_at`)
in-process, and SIGTERM to a real `python -m launch.train` process."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from data_pipeline.loader import make_data
from qv_jax.train.loop import train
from qv_jax.train.metrics import read_metrics
from test_train_util import CACHE_DIR, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, **overrides):
  c = tiny_config(1, **overrides)
  return train(c, workdir=str(workdir), devices=[jax.devices()[0]])


def test_stop_and_resume_matches_uninterrupted(tmp_path):
  full = _run(tmp_path / "full", total_steps=6, checkpoint_every=2)
  first = _run(tmp_path / "split", total_steps=6, checkpoint_every=2, stop_at=3)
  assert first.final_step == 3 and sorted(first.losses) == [1, 2, 3]
  second = _run(tmp_path / "split", total_steps=6, checkpoint_every=2)
  assert second.start_step == 3 and sorted(second.losses) == [4, 5, 6]
  resumed = {**first.losses, **second.losses}
  assert resumed == full.losses                      # bit-identical, not merely close
  assert len(set(full.losses.values())) > 1
  # keep-N: the default keeps 3 checkpoints.
  steps = sorted(int(n) for n in os.listdir(tmp_path / "split" / "checkpoints") if n.isdigit())
  assert steps[-1] == 6 and len(steps) <= 3


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path):
  workdir = tmp_path / "killed"
  total = 2000
  cmd = [sys.executable, "-m", "launch.train", "--cpu_devices=1",
         "--config", "configs/quicksviewer.py:size=tiny,stage=1", "--workdir", str(workdir),
         "--config.data.dataset_name=synthetic", "--config.data.max_text_len=128",
         "--config.data.max_seq_len=128", f"--config.train.total_steps={total}", "--config.train.log_every=1",
         "--config.train.progress_bar=False", "--config.train.tensorboard=False",
         f"--config.train.compilation_cache_dir={CACHE_DIR}", "--config.mesh.data=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if any(r["step"] >= 3 for r in read_metrics(str(workdir))):
        break
      time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["interrupted"] is True
  killed_at = summary["final_step"]
  assert 3 <= killed_at < total
  assert os.path.isdir(workdir / "checkpoints" / str(killed_at))

  before = {r["step"]: r["loss"] for r in read_metrics(str(workdir))}
  after = _run(workdir, total_steps=total, stop_at=killed_at + 2)
  assert after.start_step == killed_at
  reference = _run(tmp_path / "reference", total_steps=total, stop_at=killed_at + 2)
  assert {**before, **after.losses} == reference.losses


@pytest.fixture(scope="module")
def scene_dataset(tmp_path_factory):
  """A small TFDS dataset of procedural scene videos and its tokenizer."""
  from data_pipeline import synthetic
  from data_pipeline.tfds_builder import build_dataset
  from data_pipeline.tokenizer import build_tiny_tokenizer
  root = tmp_path_factory.mktemp("scenes")
  made = synthetic.write_dataset(str(root / "data"), num_videos=12, seed=3)
  tokenizer = build_tiny_tokenizer(made["captions"] + [synthetic.QUESTION, "0123456789."],
                                   str(root / "tokenizer.json"), vocab_size=300)
  build_dataset(jsonl=made["jsonl"], media_root=made["media_root"], data_dir=str(root / "tfds"), name="scenes")
  return str(root / "tfds"), tokenizer


def test_resume_with_the_grain_loader_matches_uninterrupted(tmp_path, scene_dataset):
  tfds_dir, tokenizer = scene_dataset

  def run(workdir, **kw):
    c = tiny_config(1, total_steps=5, **kw)
    c.data.dataset_name, c.data.dataset_dir, c.data.tokenizer_path = "scenes", tfds_dir, tokenizer
    c.data.num_workers = 0
    return train(c, workdir=str(workdir), data=make_data, devices=[jax.devices()[0]])

  full = run(tmp_path / "full")
  first = run(tmp_path / "split", stop_at=2)
  second = run(tmp_path / "split")
  assert second.start_step == 2
  assert {**first.losses, **second.losses} == full.losses
  state = json.loads((tmp_path / "split" / "checkpoints" / "2" / "data" / "process_0-of-1.json").read_text())
  assert "pipeline" in state["json"] and "skips" in state["json"]     # the loader's own iterator state


def _tensorboard_scalar_steps(logdir, tag="train/loss"):
  """The steps TensorBoard shows for `tag`: events in file order, a file-version event with a step purging
  every later-or-equal step seen before (TensorBoard's purge_step rule)."""
  import struct
  from tensorboardX.proto import event_pb2
  steps = []
  for name in sorted(os.listdir(logdir)):
    data = open(os.path.join(logdir, name), "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      if ev.file_version and ev.step:
        steps = [s for s in steps if s < ev.step]
      steps += [ev.step for v in ev.summary.value if v.tag == tag]
  return steps


def test_damaged_latest_checkpoint_resumes_from_the_previous_one_once_in_the_metrics(tmp_path):
  full = _run(tmp_path / "full", total_steps=5, checkpoint_every=2)
  first = _run(tmp_path / "split", total_steps=5, checkpoint_every=2, stop_at=3, tensorboard=True)
  params = tmp_path / "split" / "checkpoints" / "3" / "params" / "d"
  victim = max(params.iterdir(), key=lambda p: p.stat().st_size)
  raw = bytearray(victim.read_bytes())
  raw[len(raw) // 2] ^= 0x01
  victim.write_bytes(bytes(raw))
  second = _run(tmp_path / "split", total_steps=5, checkpoint_every=2, tensorboard=True)
  assert second.start_step == 2 and sorted(second.losses) == [3, 4, 5]
  assert {**first.losses, **second.losses} == full.losses
  assert (tmp_path / "split" / "checkpoints" / "3.damaged").is_dir()
  records = read_metrics(str(tmp_path / "split"))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
  assert {r["step"]: r["loss"] for r in records} == full.losses
  assert sorted(_tensorboard_scalar_steps(tmp_path / "split" / "tensorboard")) == [1, 2, 3, 4, 5]


def test_trim_records_keeps_other_stages_and_drops_torn_lines(tmp_path):
  from qv_jax.train.metrics import trim_records
  path = tmp_path / "metrics.jsonl"
  lines = [{"step": 1, "stage": 2}, {"step": 5, "stage": 1}, {"step": 2, "stage": 2}, {"step": 3, "stage": 2}]
  path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "sta')
  assert trim_records(str(path), 2, stage=2) == 2
  assert read_metrics(str(tmp_path)) == lines[:3]
