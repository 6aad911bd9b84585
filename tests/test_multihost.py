"""Two local processes with `jax.distributed` (CPU collectives over loopback, 4 devices each) train exactly
like one process with 8 devices and the same global batch; each process feeds its own rows and writes its
own data-iterator state into the shared checkpoint; the pair resumes from it."""

import json
import os

import jax
import numpy as np
import pytest

from qv_jax.train.loop import train
from process_util import train_pair
from test_train_util import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _launch_pair(workdir, steps, stop_at=0):
  return train_pair(workdir, ["--config.data.batch_size=8", f"--config.train.total_steps={steps}",
                              f"--config.train.stop_at={stop_at}"])


def test_two_processes_train_like_one(tmp_path):
  steps = 4
  pair = _launch_pair(tmp_path / "pair", steps, stop_at=2)
  assert pair["final_step"] == 2
  data_dir = tmp_path / "pair" / "checkpoints" / "2" / "data"
  assert sorted(os.listdir(data_dir)) == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  states = [json.loads((data_dir / f"process_{i}-of-2.json").read_text()) for i in range(2)]
  assert states[0] == states[1] == {"json": {"next_index": 2}}
  step_files = os.listdir(tmp_path / "pair" / "checkpoints" / "2")     # each process hashed its share
  assert sorted(n for n in step_files if n.startswith("qv_checksums")) == ["qv_checksums-0-of-2.json",
                                                                           "qv_checksums-1-of-2.json"]
  resumed = _launch_pair(tmp_path / "pair", steps)
  assert resumed["start_step"] == 2 and resumed["final_step"] == steps

  c = tiny_config(1, batch_size=8, total_steps=steps)
  single = train(c, workdir=str(tmp_path / "single"), devices=jax.devices()[:8])
  together = {int(k): v for k, v in {**pair["losses"], **resumed["losses"]}.items()}
  assert sorted(together) == list(range(1, steps + 1))
  np.testing.assert_allclose([together[s] for s in range(1, steps + 1)],
                             [single.losses[s] for s in range(1, steps + 1)], rtol=2e-5)
