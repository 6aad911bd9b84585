"""Ahead-of-time compiles for TPU topologies (libtpu, no TPU): the planner compiles the trainer's exact step
with the abstract state, whose shardings are the ones the CPU trainer builds. Each compile takes about a
minute on 2 cores, hence `slow`."""

import re
import subprocess

import jax
import numpy as np
import pytest

from configs.quicksviewer import get_config
from qv_jax.plan.target import load_target, target_mesh
from qv_jax.plan.train_plan import apply_overrides, plan_train, sharded_bytes
from qv_jax.sharding import make_mesh
from qv_jax.train.loop import enable_compilation_cache
from qv_jax.train.state import create_train_state, train_state_spec
from test_train_util import CACHE_DIR


def _config(size, mesh=(1, 4, 1)):
  c = get_config(f"size={size},stage=3")
  c.data.max_text_len = c.data.max_seq_len = 128
  return apply_overrides(c, batch=4, frames=4, mesh_shape=mesh)


def _specs(tree):
  return [s.spec if hasattr(s, "spec") else s.sharding.spec for s in jax.tree.leaves(tree)]


def test_cpu_trainer_and_planner_build_the_same_shardings():
  enable_compilation_cache(CACHE_DIR)
  c = _config("tiny", mesh=(2, 2, 2))
  cpu_mesh = make_mesh(c.mesh, jax.devices()[:8])
  state, _ = create_train_state(c, cpu_mesh)
  planned, _ = train_state_spec(c, target_mesh(load_target("v5p:2x2x2"), (2, 2, 2)))
  assert jax.tree.structure(state) == jax.tree.structure(planned)
  assert [x.sharding.spec for x in jax.tree.leaves(state)] == _specs(planned)
  assert any(s != jax.sharding.PartitionSpec() for s in _specs(planned))


def test_abstract_state_builds_under_a_topology_mesh():
  """optax's tree_map_params ran `init` eagerly, which fails on compile-only devices under set_mesh."""
  c = _config("tiny")
  mesh = target_mesh(load_target("v5e:2x2"), (1, 4, 1))
  with jax.set_mesh(mesh):
    abstract, spec = train_state_spec(c, mesh)
  leaves = jax.tree.leaves(abstract)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding.mesh == mesh for x in leaves)
  mu = jax.tree.leaves(abstract.opt_state)
  assert any(x.sharding.spec != jax.sharding.PartitionSpec() for x in mu)


@pytest.mark.parametrize("step", ["train", "prefill"])
def test_a_state_larger_than_hbm_is_refused_before_compiling(step, monkeypatch):
  """The exact per-chip state bytes exceed a (shrunk) chip's HBM: refused in seconds, never compiled."""
  import dataclasses
  from qv_jax.config.errors import ConfigError
  from qv_jax.plan.infer_plan import plan_infer
  target = load_target("v5e:2x2")
  c = _config("tiny")
  mesh = target_mesh(target, (1, 4, 1))
  with jax.set_mesh(mesh):
    state = sharded_bytes(train_state_spec(c, mesh)[0])
  hbm = int(state) - 1 if step == "train" else 2 ** 10   # prefill: params and KV cache, less than the train state
  target = dataclasses.replace(target, chip=dataclasses.replace(target.chip, hbm_bytes=hbm))
  monkeypatch.setattr(jax.stages.Lowered, "compile", lambda *a, **k: pytest.fail("compiled"))
  with pytest.raises(ConfigError, match=r"1,4,1,1 on v5e:2x2 does not fit: .* alone is .*not compiled"):
    if step == "train":
      plan_train(c, target, (1, 4, 1))
    else:
      plan_infer(apply_overrides(c, batch=1), target, (1, 4, 1), "prefill")


@pytest.mark.slow
@pytest.mark.parametrize("size,topology", [("tiny", "v5e:2x2"), ("small", "v5p:2x2x1")])
def test_train_step_compiles_for_topology(size, topology):
  c = _config(size)
  report = plan_train(c, load_target(topology), (1, 4, 1))
  mem = report["memory_per_chip"]
  assert report["chips"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "context": 1, "tensor": 1}
  assert mem["fits"] and 0 < mem["total_bytes"] < mem["hbm_bytes"]
  # per-chip argument bytes by hand: the batch and a few params, sharded 4 ways over fsdp
  d = c.data
  frames = 4 * 4 * d.image_size ** 2 * 3                       # uint8 [B, F, S, S, 3]
  per_sample = 3 * 4 + 4 * d.max_text_len * 3 + d.max_text_len + 4 * 4   # [B] ints, [B, L] ints+bool, [B, F]
  assert mem["batch_bytes"] == (frames + 4 * per_sample) / 4
  abstract, _ = train_state_spec(c, target_mesh(load_target(topology), (1, 4, 1)))
  emb = abstract.params["decoder"]["embed_tokens"]["embedding"]  # (vocab, embed) -> embed over fsdp
  vocab, dim = emb.shape
  assert sharded_bytes(emb) == vocab * dim * 4 / 4
  head = abstract.params["decoder"]["lm_head"]["kernel"]
  assert sharded_bytes(head) == dim * vocab * 4 / 4
  assert mem["state_bytes"] == sharded_bytes(abstract)
  # the compiler's argument bytes hold every argument (TPU tiling only pads upwards)
  assert mem["argument_bytes"] >= mem["state_bytes"] + mem["batch_bytes"]
  coll = report["collectives_per_chip"]
  assert coll["wire_bytes_by_axis"].get("fsdp", 0) > 0 and coll["executions_by_kind"]["all-gather"] > 0
  roof = report["roofline"]
  assert roof["step_s"] > 0 and 0 < roof["mfu"] < 1 and report["compile_s"] > 0
  assert report["flops_per_chip"]["jaxpr_matmul"] > 0
  phases = report["compile_phases_s"]   # wall seconds per phase, and XLA's CPU seconds beside them
  assert phases["xla_compile_cpu_s"] > 0
  assert report["compile_s"] == pytest.approx(sum(v for k, v in phases.items() if k != "xla_compile_cpu_s"))


def test_one_compile_function():
  """The trainer, the benchmark, the planner and the tests compile the train step through one function."""
  out = subprocess.run(["git", "grep", "-nE", r"^def (compile_train_step|jit_train_step)\("], capture_output=True,
                       text=True).stdout.strip().splitlines()
  assert [l.split(":")[0] for l in out] == ["qv_jax/train/compile.py"] * 2
  for path in ("qv_jax/train/loop.py", "benchmarks/train_step.py", "qv_jax/plan/train_plan.py",
               "tests/test_train_step.py"):
    src = open(path).read()
    assert "compile_train_step(" in src, path
    assert not re.search(r"jax\.jit\(step", src), path


@pytest.mark.slow
def test_decode_step_compiles_with_an_abstract_kv_cache():
  from qv_jax.plan.infer_plan import plan_infer
  c = apply_overrides(_config("tiny"), param_dtype="bfloat16")
  report = plan_infer(c, load_target("v5e:1x1"), (1, 1, 1), "decode", new_tokens=16)
  dec = c.model.decoder
  slots = c.data.max_seq_len + 16 - 1                                         # the Generator's P + N - 1
  kv = 2 * dec.num_layers * 4 * slots * dec.num_kv_heads * dec.head_dim * 4   # k and v, fp32 compute (tiny)
  assert report["memory_per_chip"]["cache_bytes"] == kv + 4 * slots * (1 + 4) + 4   # valid, positions, index
  assert report["cache_slots"] == slots and report["tokens_per_step"] == 4
  assert report["memory_per_chip"]["fits"] and report["roofline"]["step_s"] > 0


def test_planner_infers_with_the_generators_steps(monkeypatch):
  """`--step prefill|decode` trace the Generator's own prefill and decode-loop body (one definition each)."""
  from flax import nnx
  from qv_jax.model import generate
  from qv_jax.model.decoder import Decoder
  from qv_jax.plan.infer_plan import abstract_decode_state, abstract_model, abstract_sampling, make_steps
  from qv_jax.train.compile import abstract_batch
  out = subprocess.run(["git", "grep", "-nE", r"^def (prefill_step|decode_step)\("], capture_output=True,
                       text=True).stdout.strip().splitlines()
  assert [l.split(":")[0] for l in out] == ["qv_jax/model/generate.py"] * 2
  assert not re.search(r"decoder\(", open("qv_jax/plan/infer_plan.py").read())

  calls = []
  for name in ("prefill_step", "decode_step"):
    real = getattr(generate, name)
    monkeypatch.setattr(generate, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
  c = _config("tiny", mesh=(1, 1, 1))
  mesh = make_mesh(c.mesh, jax.devices()[:1])
  graphdef, params = abstract_model(c, mesh)
  sampling, flags = abstract_sampling(mesh, 3)
  state = abstract_decode_state(graphdef, params, c, mesh, 4, c.data.max_seq_len, 3)
  prefill, decode = make_steps(graphdef, new_tokens=3, flags=flags)
  with jax.set_mesh(mesh):
    prefilled = jax.eval_shape(prefill, params, abstract_batch(c, mesh), sampling)
    jax.eval_shape(decode, params, state, sampling)
  assert calls == ["prefill_step", "decode_step"]
  assert jax.tree.map(lambda x: (x.shape, x.dtype), prefilled) == jax.tree.map(lambda x: (x.shape, x.dtype), state)

  calls.clear()
  decoder = Decoder(c.model.decoder, rngs=nnx.Rngs(0))
  gen = generate.Generator(decoder, max_new_tokens=3, eos_id=None, pad_id=0)
  st = gen.advance(gen.start(input_ids=np.ones((1, 7), np.int32)))   # a prompt shape no other test traces
  assert calls == ["prefill_step", "decode_step"] and st.out.shape == (1, 3)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_small_inference_steps_compile_for_v5e(step):
  from qv_jax.plan.infer_plan import plan_infer
  c = apply_overrides(_config("small"), param_dtype="bfloat16")
  report = plan_infer(c, load_target("v5e:2x2"), (1, 4, 1), step, new_tokens=8)
  mem = report["memory_per_chip"]
  assert report["chips"] == 4 and report["step"] == step and report["cache_slots"] == c.data.max_seq_len + 7
  assert mem["fits"] and mem["state_bytes"] > 0 and mem["cache_bytes"] > 0
  # the decode state is donated into the step; the prefill creates the cache, so its outputs hold it
  if step == "decode":
    assert mem["alias_bytes"] >= mem["cache_bytes"]
  else:
    assert mem["output_bytes"] >= mem["cache_bytes"]
  assert report["tokens_per_step"] == (4 * c.data.max_seq_len if step == "prefill" else 4)
  assert report["roofline"]["step_s"] > 0 and report["flops_per_chip"]["jaxpr_matmul"] > 0
