"""Loading groups (`qv_jax.sharding.loading_groups`): hosts whose devices hold the same batch rows load the
same rows, so a global batch smaller than the host count trains when a sample spans hosts (context axis,
issue #11). Fake devices on hand-built meshes for the grouping; two local processes over jax.distributed
for the whole path (loader, check_config, to_global)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from qv_jax.config import ConfigError
from qv_jax.config.mesh import MESH_AXES
from qv_jax.sharding import loading_groups
from qv_jax.train.synthetic_batches import SyntheticBatches
from process_util import train_pair
from test_train_util import tiny_config


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  process_index: int
  slice_index: int = 0


def _mesh(shape, host_of) -> Mesh:
  devices = [FakeDevice(i, host_of(i)) for i in range(int(np.prod(shape)))]
  return Mesh(np.array(devices, dtype=object).reshape(shape), MESH_AXES)


def _all(mesh, hosts):
  return [loading_groups(mesh, p) for p in range(hosts)]


def test_context_spanning_hosts_makes_one_group():
  assert _all(_mesh((1, 1, 8, 1), lambda i: i // 4), 2) == [(1, 0), (1, 0)]
  assert _all(_mesh((1, 1, 4, 2), lambda i: i // 4), 2) == [(1, 0), (1, 0)]


def test_issue_layout_v5p_128():
  # qwen2_7b on v5p-128: 32 hosts x 4 chips, mesh data 1, fsdp 16, context 4, tensor 2 -> 16 pairs of hosts
  got = _all(_mesh((1, 16, 4, 2), lambda i: i // 4), 32)
  assert got == [(16, p // 2) for p in range(32)]


def test_every_host_its_own_group_keeps_process_index():
  assert _all(_mesh((2, 2, 1, 2), lambda i: i // 2), 4) == [(4, p) for p in range(4)]
  # hosts holding non-adjacent shards (0, 2 / 1, 3) still form their own groups, numbered by host
  assert _all(_mesh((1, 4, 1, 1), lambda i: i % 2), 2) == [(2, 0), (2, 1)]
  assert _all(_mesh((2, 2, 2, 1), lambda i: 0), 1) == [(1, 0)]


def test_groups_are_numbered_by_their_lowest_host():
  # the first data row on hosts 2, 3 and the second on hosts 0, 1: group 0 is hosts {0, 1}
  mesh = _mesh((2, 1, 8, 1), lambda i: (i // 4 + 2) % 4)
  assert _all(mesh, 4) == [(2, 0), (2, 0), (2, 1), (2, 1)]


def test_slices_with_repeated_process_indices_are_different_hosts():
  devices = [FakeDevice(i, (i // 2) % 2, i // 4) for i in range(8)]
  mesh = Mesh(np.array(devices, dtype=object).reshape(2, 1, 4, 1), MESH_AXES)
  assert loading_groups(mesh, 0)[0] == 2


def test_overlapping_or_unequal_shards_are_one_error():
  # fsdp 2 x context 3 over hosts of 4 devices: host 0 holds shards {0, 1}, host 1 only {1}
  with pytest.raises(ConfigError, match=r"mesh.*host 0 .*\[0, 1\].*host 1 .*\[1\].*same or disjoint"):
    loading_groups(_mesh((1, 2, 3, 1), lambda i: i // 4), 0)
  with pytest.raises(ConfigError, match="process 5 holds no device"):
    loading_groups(_mesh((1, 1, 8, 1), lambda i: i // 4), 5)


def test_synthetic_groups_split_the_global_batch():
  c = tiny_config(1, batch_size=4)
  whole = next(SyntheticBatches(c, seed=3))
  parts = [next(SyntheticBatches(c, seed=3, process_index=g, process_count=2)) for g in range(2)]
  for k in ("input_ids", "frames", "sample_id"):
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def _launch_pair(workdir, steps):
  return train_pair(workdir, ["--config.data.batch_size=1", "--config.mesh.data=1", "--config.mesh.fsdp=1",
                              "--config.mesh.context=8", "--config.mesh.tensor=1",
                              f"--config.train.total_steps={steps}"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_batch_of_one_over_two_hosts_trains_like_one_process(tmp_path):
  steps = 2
  pair = _launch_pair(tmp_path / "pair", steps)
  assert pair["final_step"] == steps
  data_dir = tmp_path / "pair" / "checkpoints" / str(steps) / "data"
  states = [json.loads((data_dir / f"process_{i}-of-2.json").read_text()) for i in range(2)]
  assert states[0] == states[1]                 # one loading group: the same rows, the same position

  c = tiny_config(1, batch_size=1, total_steps=steps)
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = 1, 1, 8, 1
  single = train_single(c, tmp_path / "single")
  pair_losses = {int(k): v for k, v in pair["losses"].items()}
  assert sorted(pair_losses) == list(range(1, steps + 1))
  np.testing.assert_allclose([pair_losses[s] for s in range(1, steps + 1)],
                             [single.losses[s] for s in range(1, steps + 1)], rtol=2e-5)


def train_single(config, workdir):
  from qv_jax.train.loop import train
  return train(config, workdir=str(workdir), devices=jax.devices()[:8])
