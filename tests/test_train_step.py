"""The train step: sharded over 8 host CPU devices equals one device; gradient accumulation keeps the
global token mean; the synthetic batches follow the batch contract."""

import jax
import numpy as np
import pytest

from qv_jax.batch import batch_shapes
from qv_jax.sharding import axis_rules, make_mesh
from qv_jax.train.loop import enable_compilation_cache, to_global
from qv_jax.train.state import create_train_state, full_params
from qv_jax.train.compile import compile_train_step
from qv_jax.train.step import make_train_step
from qv_jax.train.synthetic_batches import SyntheticBatches
from qv_jax.config import validate
from test_train_util import CACHE_DIR, tiny_config


def run_steps(config, devices, num_steps):
  config = validate(config)
  enable_compilation_cache(CACHE_DIR)
  mesh = make_mesh(config.mesh, devices)
  data = SyntheticBatches(config, seed=3, image_fraction=0.25)
  metrics = []
  with jax.set_mesh(mesh), axis_rules(config.sharding_rules):
    state, spec = create_train_state(config, mesh)
    step = make_train_step(spec.graphdef, config, spec.tx)
    fn = None
    for _ in range(num_steps):
      batch = to_global(next(data), mesh)
      fn = fn or compile_train_step(step, spec, state, batch)
      state, m = fn(state, batch)
      metrics.append(jax.device_get(m))
    return jax.device_get(full_params(state)), metrics, state


def _config(accum=1, data=1, fsdp=1, tensor=1):
  c = tiny_config(1, batch_size=8, total_steps=10, warmup_ratio=0.0, learning_rate=1e-3, grad_accum=accum)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return c


@pytest.fixture(scope="module")
def single():
  return run_steps(_config(), [jax.devices()[0]], 2)


def _assert_trees_close(a, b, steps=2, lr=1e-3):
  """Adam's first steps move a parameter by about ±lr whatever its gradient's size, so the few elements
  whose gradients are rounding noise may differ by up to 2·lr per step; all others must agree closely."""
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  loose, total = 0, 0
  for path, x in flat_a:
    diff = np.abs(np.asarray(x) - np.asarray(flat_b[path]))
    assert diff.max() <= 2 * lr * steps, (jax.tree_util.keystr(path), diff.max())
    loose += int((diff > 1e-5).sum())
    total += diff.size
  assert loose <= 1e-3 * total, (loose, total)


def test_sharded_step_equals_single_device(single):
  params_1, metrics_1, _ = single
  params_8, metrics_8, state_8 = run_steps(_config(data=2, fsdp=2, tensor=2), jax.devices()[:8], 2)
  # The state really is spread over the mesh: some parameter is split over fsdp or tensor.
  specs = [x.sharding.spec for x in jax.tree.leaves(state_8.params)]
  assert any(any(s is not None for s in spec) for spec in specs)
  for m1, m8 in zip(metrics_1, metrics_8):
    for k in ("loss", "ce", "aux", "grad_norm"):
      np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, err_msg=k)
    np.testing.assert_array_equal(m8["cube_length_hist"], m1["cube_length_hist"])
  assert metrics_1[1]["loss"] != metrics_1[0]["loss"]
  _assert_trees_close(params_8, params_1)


def test_gradient_accumulation_keeps_the_global_token_mean(single):
  params_1, metrics_1, _ = single
  params_a, metrics_a, _ = run_steps(_config(accum=4), [jax.devices()[0]], 2)
  for m1, ma in zip(metrics_1, metrics_a):
    np.testing.assert_allclose(ma["ce"], m1["ce"], rtol=1e-5)          # Σ CE / all supervised tokens
    assert ma["supervised_tokens"] == m1["supervised_tokens"]
    np.testing.assert_allclose(ma["sample_ce"], m1["sample_ce"], rtol=1e-5)
    np.testing.assert_allclose(ma["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(ma["aux"], m1["aux"], rtol=1e-5)
  _assert_trees_close(params_a, params_1)


def test_synthetic_batches_follow_the_contract_and_restore():
  c = tiny_config(1, batch_size=4)
  it = SyntheticBatches(c, seed=1, image_fraction=0.5, process_index=1, process_count=2)
  b0 = next(it)
  state = it.get_state()
  b1 = next(it)
  for k, (shape, dtype) in batch_shapes(c, 2, 16).items():
    assert b0[k].shape == shape and b0[k].dtype == np.dtype(dtype), k
  assert b0["sample_id"].tolist() == [2, 3]            # process 1 of 2 takes the second half
  it2 = SyntheticBatches(c, seed=1, image_fraction=0.5, process_index=1, process_count=2)
  it2.set_state(state)
  again = next(it2)
  for k in b1:
    np.testing.assert_array_equal(again[k], b1[k])
