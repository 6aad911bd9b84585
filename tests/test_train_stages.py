"""Stages through the training loop: stage 1 trains only the compressor and the token embeddings, stage 2
starts from stage 1's checkpoint (`train.init_from`) and trains lm_head, compressor and the vision tower;
frozen parameters are bit-identical after a stage and keep no optimizer state; η and the learning rate
follow their schedules and restart with every stage."""

import math

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from qv_jax.config import validate
from qv_jax.config.train import STAGE_TRAINABLE
from qv_jax.model.gumbel import gumbel_noise_weight
from qv_jax.sharding import axis_rules, make_mesh
from qv_jax.train import checkpoint as ckpt
from qv_jax.train.loop import train
from qv_jax.train.schedules import learning_rate_schedule, noise_weight
from qv_jax.train.stages import trainable_groups
from qv_jax.train.state import create_train_state, full_params, merge_trees, train_state_spec
from test_train_util import tiny_config

STEPS = 5


def _names(tree):
  return {"/".join(map(str, k)) for k in flatten_dict(tree)}


def _load(workdir, config):
  config = validate(config)
  mesh = make_mesh(config.mesh, [jax.devices()[0]])
  with jax.set_mesh(mesh), axis_rules(config.sharding_rules):
    abstract, _ = train_state_spec(config, mesh)
    return jax.device_get(ckpt.load_params(workdir, merge_trees(abstract.params, abstract.frozen)))


def _initial(config):
  config = validate(config)
  mesh = make_mesh(config.mesh, [jax.devices()[0]])
  with jax.set_mesh(mesh), axis_rules(config.sharding_rules):
    state, _ = create_train_state(config, mesh)
    return jax.device_get(full_params(state)), jax.device_get(state.opt_state)


def _changed(before, after):
  a, b = flatten_dict(before), flatten_dict(after)
  return {"/".join(map(str, k)) for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k]))}


def _config(stage, **kw):
  c = tiny_config(stage, total_steps=STEPS, learning_rate=1e-3, **kw)
  c.mesh.data = 1
  return c


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
  root = tmp_path_factory.mktemp("stages")
  out = {}
  for stage in (1, 2):
    c = _config(stage, init_from=str(root / "stage1") if stage == 2 else "")
    seen = []
    summary = train(c, workdir=str(root / f"stage{stage}"), devices=[jax.devices()[0]],
                    on_step=lambda s, m: seen.append((s, float(m["eta"]), float(m["learning_rate"]))))
    out[stage] = dict(config=c, summary=summary, seen=seen, params=_load(str(root / f"stage{stage}"), c))
  out[1]["initial"], out[1]["initial_opt"] = _initial(out[1]["config"])
  return out


def test_stage1_trains_only_compressor_and_embeddings(stages):
  changed = _changed(stages[1]["initial"], stages[1]["params"])
  assert changed, "stage 1 changed nothing"
  assert all(n.startswith(("compressor/", "decoder/embed_tokens/")) for n in changed), sorted(changed)
  assert any(n.startswith("compressor/resampler/") for n in changed)
  assert any(n.startswith("compressor/cubing/") for n in changed)      # via the thumbnail and aux terms
  assert "decoder/embed_tokens/embedding" in changed
  # Everything else (vision tower, decoder layers, norm, lm_head) is bit-identical to the initialisation.
  frozen = {n for n in _names(stages[1]["initial"])
            if not n.startswith(("compressor/", "decoder/embed_tokens/"))}
  assert "decoder/lm_head/kernel" in frozen and any(n.startswith("vision_tower/") for n in frozen)
  assert not (frozen & changed)


def test_frozen_parameters_keep_no_optimizer_state(stages):
  opt = stages[1]["initial_opt"]
  adam = [s for s in jax.tree.leaves(opt, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
  assert len(adam) == 1
  names = _names(adam[0].mu)
  assert names == _names(adam[0].nu)
  assert all(n.startswith(("compressor/", "decoder/embed_tokens/")) for n in names)
  assert any(n.startswith("compressor/") for n in names) and "decoder/embed_tokens/embedding" in names
  n_moments = sum(np.size(x) for x in jax.tree.leaves(adam[0].mu))
  n_all = sum(np.size(x) for x in jax.tree.leaves(stages[1]["initial"]))
  assert n_moments < n_all


def test_stage2_starts_from_stage1_and_freezes_the_rest(stages):
  s1, s2 = stages[1]["params"], stages[2]["params"]
  changed = _changed(s1, s2)
  assert "decoder/lm_head/kernel" in changed
  assert any(n.startswith("vision_tower/") for n in changed)          # the paper's intent (not the reference)
  assert any(n.startswith("compressor/") for n in changed)
  assert not any(n.startswith(("decoder/embed_tokens/", "decoder/layers/", "decoder/norm/")) for n in changed)
  # Stage 2 began at stage 1's result, not at a fresh initialisation.
  fresh = stages[1]["initial"]
  np.testing.assert_array_equal(s2["decoder"]["embed_tokens"]["embedding"],
                                s1["decoder"]["embed_tokens"]["embedding"])
  assert not np.array_equal(s2["decoder"]["embed_tokens"]["embedding"],
                            fresh["decoder"]["embed_tokens"]["embedding"])


def test_stage_groups_and_reference_flag():
  assert trainable_groups(_config(1)) == ("compressor", "embed_tokens")
  assert set(trainable_groups(_config(2))) == {"compressor", "lm_head", "vision_tower"}
  assert set(trainable_groups(_config(3))) == {"compressor", "vision_tower", "decoder"}
  ref = _config(2, reference_frozen_vision_tower=True)
  assert "vision_tower" not in trainable_groups(ref)
  assert set(STAGE_TRAINABLE) == {1, 2, 3}


def test_eta_and_learning_rate_follow_their_schedules_and_restart(stages):
  for stage in (1, 2):
    c = stages[stage]["config"]
    horizon = 0.6 * STEPS
    warm = math.ceil(0.02 * STEPS)
    for step, eta, lr in stages[stage]["seen"]:
      done = step - 1                                          # optimizer steps completed before this one
      want = 0.01 + 0.99 * (1 + math.cos(math.pi * min(done, horizon) / horizon)) / 2
      assert eta == pytest.approx(want, rel=1e-5), (stage, step)
      peak = c.train.learning_rate
      want_lr = (peak * done / warm if done < warm
                 else peak * 0.5 * (1 + math.cos(math.pi * (done - warm) / (STEPS - warm))))
      assert lr == pytest.approx(want_lr, rel=1e-5, abs=1e-12), (stage, step)
    assert stages[stage]["seen"][0][1] == pytest.approx(1.0)   # η restarts at 1 in every stage
  assert [s for s, _, _ in stages[1]["seen"]] == list(range(1, STEPS + 1))


def test_noise_weight_matches_the_compressor_schedule():
  c = _config(1)
  c.train.total_steps = 1000
  for step in (0, 1, 100, 599, 600, 601, 999):
    ours = float(noise_weight(step, c.train))
    theirs = float(gumbel_noise_weight(step, 1000))
    assert ours == pytest.approx(theirs, rel=1e-6)
  assert float(noise_weight(0, c.train)) == pytest.approx(1.0)
  assert float(noise_weight(800, c.train)) == pytest.approx(0.01)
  sched = learning_rate_schedule(c.train)
  assert float(sched(0)) == 0.0 and float(sched(20)) == pytest.approx(c.train.learning_rate)


def test_stage1_from_a_converted_release_keeps_a_fresh_compressor(tmp_path):
  """`train.init_from` may name a `qv-convert` output holding SigLIP and the LLM only (the reference's
  stage 1: a new resampler and cubing network on pretrained parts)."""
  from qv_jax.convert.writer import ParamWriter, flatten, write_metadata
  c = validate(_config(1))
  reference, _ = _initial(_config(1, seed=7))                   # "pretrained" weights: another seed
  writer = ParamWriter(str(tmp_path / "converted"))
  stored = {p: np.asarray(v) for p, v in flatten(reference).items() if not p.startswith("compressor/")}
  for p, v in stored.items():
    writer.add(p, v)
  writer.finalize()
  write_metadata(str(tmp_path / "converted"), c, {"params": {p: [list(v.shape), str(v.dtype)]
                                                           for p, v in stored.items()}})
  assert ckpt.is_converted(str(tmp_path / "converted"))
  fresh, _ = _initial(c)
  mesh = make_mesh(c.mesh, [jax.devices()[0]])
  with jax.set_mesh(mesh), axis_rules(c.sharding_rules):
    state, _ = create_train_state(c, mesh, partial=True, params_loader=lambda a: ckpt.load_converted_params(
        str(tmp_path / "converted"), a))
    got = flatten(jax.device_get(full_params(state)))
  for p, v in got.items():
    want = stored[p] if p in stored else flatten(fresh)[p]
    np.testing.assert_array_equal(v, want, err_msg=p)
  assert any(p.startswith("compressor/") for p in got) and not any(p.startswith("compressor/") for p in stored)
