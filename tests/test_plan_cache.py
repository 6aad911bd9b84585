"""The planner's cache of compiled programs (qv_jax/plan/cache.py): a planned program is read back, not
recompiled (JAX's own persistent cache cannot load what a compile-only TPU client wrote), and a damaged
entry is a miss."""

import gzip
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qv_jax.plan.cache import CompiledFacts, PlanCache, program_key

TARGET = types.SimpleNamespace(topology="v5e:2x2", num_slices=1)


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))


def _lowered(fn):
  return jax.jit(fn).lower(jax.ShapeDtypeStruct((4, 4), jnp.float32))


def _f(x):
  return jnp.tanh(x) @ x


def _g(x):
  return jnp.tanh(x) @ x.T


def test_key_follows_the_program_not_its_source_lines():
  mesh = _mesh()
  scope = {"jnp": jnp}
  exec(compile("\n" * 40 + "def _f(x):\n  return jnp.tanh(x) @ x\n", "elsewhere.py", "exec"), scope)
  moved = scope["_f"]                                        # the same program, defined in another file and line
  assert program_key(_lowered(_f), TARGET, mesh) == program_key(_lowered(moved), TARGET, mesh)
  assert program_key(_lowered(_f), TARGET, mesh) != program_key(_lowered(_g), TARGET, mesh)
  other = types.SimpleNamespace(topology="v5e:2x4", num_slices=1)
  assert program_key(_lowered(_f), TARGET, mesh) != program_key(_lowered(_f), other, mesh)


def test_a_compiled_program_is_stored_and_read_back(tmp_path, monkeypatch):
  cache, mesh = PlanCache(str(tmp_path)), _mesh()
  phases = {}
  first = cache.compiler(TARGET, mesh)(_lowered(_f), phases)
  assert not first.cache_hit and phases["xla_compile_s"] > 0
  real = _lowered(_f).compile()
  assert first.as_text() == real.as_text()
  assert first.memory_analysis().temp_size_in_bytes == real.memory_analysis().temp_size_in_bytes

  monkeypatch.setattr(jax.stages.Lowered, "compile", lambda *a, **k: pytest.fail("recompiled"))
  again = {}
  second = cache.compiler(TARGET, mesh)(_lowered(_f), again)
  assert second.cache_hit and second.as_text() == first.as_text()
  assert second.cost_analysis() == first.cost_analysis() and second.memory == first.memory
  assert again["xla_compile_s"] == phases["xla_compile_s"] and "cache_load_s" in again   # the stored compile's time


@pytest.mark.parametrize("damage", ["truncated_hlo", "no_facts", "bad_json"])
def test_a_damaged_entry_is_a_miss_and_is_rewritten(tmp_path, damage):
  cache = PlanCache(str(tmp_path))
  facts = CompiledFacts(memory={"temp_size_in_bytes": 1.0}, cost={"flops": 2.0}, hlo="HloModule m\n" * 500,
                        phases={"xla_compile_s": 3.0, "xla_compile_cpu_s": 4.0})
  cache.store("k", facts)
  assert cache.load("k").hlo == facts.hlo
  entry = os.path.join(str(tmp_path), "k")
  if damage == "truncated_hlo":
    data = open(os.path.join(entry, "hlo.txt.gz"), "rb").read()
    open(os.path.join(entry, "hlo.txt.gz"), "wb").write(data[: len(data) // 2])
  elif damage == "no_facts":
    os.remove(os.path.join(entry, "facts.json"))
  else:
    open(os.path.join(entry, "facts.json"), "w").write('{"memory": ')
  assert cache.load("k") is None
  cache.store("k", facts)
  assert cache.load("k").phases == facts.phases
  with gzip.open(os.path.join(entry, "hlo.txt.gz"), "rt") as f:
    assert f.read() == facts.hlo
