"""Each compressor kind trains in the trainer: the loss falls on a repeated synthetic batch; the SCORE
policy step moves the keep rate the way its advantages say."""

import jax
import pytest

from qv_jax.config import validate
from qv_jax.sharding import axis_rules, make_mesh
from qv_jax.train.loop import enable_compilation_cache, to_global
from qv_jax.train.state import create_train_state
from qv_jax.train.compile import compile_train_step
from qv_jax.train.step import make_train_step
from qv_jax.train.synthetic_batches import SyntheticBatches
from test_train_util import CACHE_DIR, single_device_mesh_config, tiny_config


def _train(config, steps):
  config = validate(config)
  enable_compilation_cache(CACHE_DIR)
  mesh = make_mesh(config.mesh, [jax.devices()[0]])
  batch_np = next(SyntheticBatches(config, seed=5))
  out = []
  with jax.set_mesh(mesh), axis_rules(config.sharding_rules):
    state, spec = create_train_state(config, mesh)
    batch = to_global(batch_np, mesh)
    fn = compile_train_step(make_train_step(spec.graphdef, config, spec.tx), spec, state, batch)
    for _ in range(steps):
      state, m = fn(state, batch)
      out.append(jax.device_get(m))
  return out


def _config(kind, **compressor):
  c = single_device_mesh_config(tiny_config(1, batch_size=2, total_steps=20, warmup_ratio=0.0,
                                            learning_rate=1e-2))
  c.model.compressor.kind = kind
  for k, v in compressor.items():
    c.model.compressor[k] = v
  return c


@pytest.mark.slow
@pytest.mark.parametrize("kind,extra", [("uniform", {}), ("score_gating", {"keep_ratio": 0.25}),
                                        ("question_select", {"select_frames": 4, "segment_frames": 4})])
def test_each_kind_trains(kind, extra):
  metrics = _train(_config(kind, **extra), 5)
  losses = [float(m["loss"]) for m in metrics]
  assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow
def test_score_policy_learns_sparsity_when_every_rollout_is_safe():
  c = _config("score_gating")
  c.train.score_rollouts = 3
  c.train.score_ce_tolerance = 1e3            # every rollout safe: advantages rank by sparsity only
  c.train.trainable_override = ("policy",)
  metrics = _train(c, 4)
  keep = [float(m["keep_rate"]) for m in metrics]
  assert all(float(m["safe_rate"]) == 1.0 for m in metrics)
  assert keep[-1] < keep[0] - 0.05, keep
