"""The planner's cache of compiled programs: what a plan reads from a compile, kept on disk per program.

JAX's persistent compilation cache cannot serve the planner: a compile-only TPU client writes its entries
but cannot load them back ("PjRtCompiler must be constructed with a Client to call
DeserializeLoadedExecutable"), so every plan recompiled. A plan needs only XLA's memory analysis, its cost
analysis and the optimized HLO text, so those are what is kept:

    cache = PlanCache("~/.cache/qv_jax/plan")
    compiled = cache.compiler(target, mesh)(lowered, phases)   # a `CompiledFacts`: cached, or compiled and stored

An entry is `<key>/facts.json` (memory, cost, the original compile's timings) and `<key>/hlo.txt.gz`. The key
hashes the lowered StableHLO (without debug info: moving a line of Python does not miss), the target
(topology, slices, device order) and the versions of jax, jaxlib and libtpu and the XLA flags in the
environment. A damaged or partial entry is a miss and is rewritten; a failed compile is not cached.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import tempfile
import time
import types
from importlib import metadata

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
                 "generated_code_size_in_bytes")


def memory_stats(compiled) -> dict[str, float]:
  """XLA's memory analysis of a compiled executable (or `CompiledFacts`), as {MEMORY_FIELDS: bytes}."""
  m = compiled.memory_analysis()
  return {f: float(getattr(m, f, 0) or 0) for f in MEMORY_FIELDS}


def cost_stats(compiled) -> dict[str, float]:
  """XLA's cost analysis (one dict, whatever the backend wraps it in), numeric entries only."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {k: float(v) for k, v in (cost or {}).items() if isinstance(v, (int, float))}


def _version(package: str) -> str:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return "none"


@dataclasses.dataclass
class CompiledFacts:
  """What the planner reads from a compiled executable, with the executable's method names."""
  memory: dict[str, float]
  cost: dict[str, float]
  hlo: str
  phases: dict[str, float]          # the compile that produced it: xla_compile_s, xla_compile_cpu_s
  cache_hit: bool = False

  def memory_analysis(self):
    return types.SimpleNamespace(**self.memory)

  def cost_analysis(self) -> dict[str, float]:
    return dict(self.cost)

  def as_text(self) -> str:
    return self.hlo

  @classmethod
  def of(cls, compiled, phases: dict[str, float]) -> "CompiledFacts":
    return cls(memory=memory_stats(compiled), cost=cost_stats(compiled), hlo=compiled.as_text(),
               phases=dict(phases))


def program_key(lowered, target, mesh) -> str:
  """sha256 of the program without debug info, the target's devices and the compiler's versions and flags."""
  h = hashlib.sha256()
  h.update(lowered.as_text(debug_info=False).encode())
  parts = dict(topology=target.topology, num_slices=target.num_slices,
               devices=[int(d.id) for d in mesh.devices.flat],
               versions=[_version(p) for p in ("jax", "jaxlib", "libtpu")],
               flags=[os.environ.get(v, "") for v in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")])
  h.update(json.dumps(parts, sort_keys=True).encode())
  return h.hexdigest()


class PlanCache:
  """Compiled facts on disk under `directory`, one folder per `program_key`."""

  def __init__(self, directory: str):
    self.directory = os.path.expanduser(directory)

  def _path(self, key: str) -> str:
    return os.path.join(self.directory, key)

  def load(self, key: str) -> CompiledFacts | None:
    path = self._path(key)
    try:
      with open(os.path.join(path, "facts.json")) as f:
        facts = json.load(f)
      with gzip.open(os.path.join(path, "hlo.txt.gz"), "rt") as f:
        hlo = f.read()
      return CompiledFacts(memory=facts["memory"], cost=facts["cost"], hlo=hlo, phases=facts["phases"],
                           cache_hit=True)
    except (OSError, EOFError, ValueError, KeyError, TypeError):
      return None

  def store(self, key: str, facts: CompiledFacts) -> None:
    os.makedirs(self.directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=self.directory)
    try:
      with gzip.open(os.path.join(tmp, "hlo.txt.gz"), "wt", compresslevel=6) as f:
        f.write(facts.hlo)
      with open(os.path.join(tmp, "facts.json"), "w") as f:
        json.dump(dict(memory=facts.memory, cost=facts.cost, phases=facts.phases,
                       stored_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), f, indent=1)
      final = self._path(key)
      shutil.rmtree(final, ignore_errors=True)       # a damaged entry from an interrupted run
      os.replace(tmp, final)
    except OSError:
      shutil.rmtree(tmp, ignore_errors=True)         # a cache that cannot be written costs a recompile only

  def compiler(self, target, mesh):
    """A `compile` hook for `compile_train_step`: lowered -> CompiledFacts, from the cache when present."""
    def compile_(lowered, phases: dict):
      key = program_key(lowered, target, mesh)
      t0 = time.perf_counter()
      hit = self.load(key)
      if hit is not None:
        phases.update(hit.phases, cache_load_s=time.perf_counter() - t0)
        return hit
      t1, c1 = time.perf_counter(), time.process_time()
      compiled = lowered.compile()
      phases.update(xla_compile_s=time.perf_counter() - t1, xla_compile_cpu_s=time.process_time() - c1)
      facts = CompiledFacts.of(compiled, {k: phases[k] for k in ("xla_compile_s", "xla_compile_cpu_s")})
      self.store(key, facts)
      return facts
    return compile_
