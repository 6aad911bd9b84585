"""The machinery behind every name-mapping table.

A table is a sequence of `Rule`s. A rule matches source tensor names (PyTorch state-dict keys) with a
regex and writes one or more target params, named by '/'-joined nnx state paths that may use the
regex's named groups (`{layer}`). A small hook (`transform`) does transposes and splits. With
`stack="layer"` the rule's group `layer` indexes axis 0 of a stacked (scanned) target.

`apply_table(table, names, load, expected)` reads tensors one at a time through `load(name)`, so a large
checkpoint streams, and checks the result against `expected` ({path: shape}): missing, extra and
mis-shaped tensors raise one `MappingError` that lists every name and shape.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray | tuple[np.ndarray, ...]]


def identity(x: np.ndarray) -> np.ndarray:
  return x


def transpose(x: np.ndarray) -> np.ndarray:
  """PyTorch Linear (out, in) -> Dense kernel (in, out)."""
  return np.ascontiguousarray(x.T)


def conv_to_hwio(x: np.ndarray) -> np.ndarray:
  """PyTorch Conv2d (O, I, kh, kw) -> (kh, kw, I, O)."""
  return np.ascontiguousarray(np.transpose(x, (2, 3, 1, 0)))


def split_thirds(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Packed q/k/v along axis 0 (MultiheadAttention in_proj) -> (q, k, v)."""
  if x.shape[0] % 3:
    raise ValueError(f"cannot split a tensor of shape {x.shape} into thirds along axis 0")
  return tuple(np.split(x, 3, axis=0))


def compose(*fns: Transform) -> Transform:
  def run(x):
    for fn in fns:
      x = fn(x) if not isinstance(x, tuple) else tuple(fn(t) for t in x)
    return x
  return run


@dataclasses.dataclass(frozen=True)
class Rule:
  source: str                       # full-match regex over source names
  targets: tuple[str, ...]          # target path templates ('{group}' fills from the regex)
  transform: Transform = identity   # returns one array, or a tuple with one array per target
  stack: str | None = None          # named group indexing axis 0 of a stacked target

  def __post_init__(self):
    object.__setattr__(self, "_regex", re.compile(self.source))
    if isinstance(self.targets, str):
      object.__setattr__(self, "targets", (self.targets,))


def rule(source: str, *targets: str, transform: Transform = identity, stack: str | None = None) -> Rule:
  return Rule(source, tuple(targets), transform, stack)


class MappingError(ValueError):
  """Source and target tensors do not match; the message lists every offending name and shape."""


@dataclasses.dataclass
class MappingReport:
  mapped: list[tuple[str, tuple[str, ...]]] = dataclasses.field(default_factory=list)
  ignored: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    return f"mapped {len(self.mapped)} source tensors, ignored {len(self.ignored)}"


def _fmt(items: Iterable[Any]) -> str:
  return "\n".join(f"  {i}" for i in items)


def raise_mismatch(headline: str, sections: Sequence[tuple[str, Sequence[str]]]) -> None:
  """Raises one `MappingError` "<headline>:" listing every non-empty (heading, item lines) section; returns
  when all are empty."""
  problems = [f"{heading}:\n" + _fmt(items) for heading, items in sections if items]
  if problems:
    raise MappingError(f"{headline}:\n" + "\n".join(problems))


def apply_table(table: Sequence[Rule], names: Iterable[str], load: Callable[[str], np.ndarray],
                expected: Mapping[str, tuple[int, ...]] | None = None,
                ignore: Sequence[str] = (), sink: Callable[[str, np.ndarray], None] | None = None
                ) -> tuple[dict[str, np.ndarray], MappingReport]:
  """Maps source tensors to target params.

  names: the source tensor names; load(name) -> np.ndarray reads one. `ignore`: regexes of source names
  that are dropped on purpose (e.g. the unused SigLIP head). expected: {target path: shape}. sink: if
  given, each finished target is handed to sink(path, array) and not kept (streaming writes).
  Returns ({target path: array}, report).
  """
  ignore_re = [re.compile(p) for p in ignore]
  out: dict[str, np.ndarray] = {}
  stacks: dict[str, dict[int, np.ndarray]] = {}
  report = MappingReport()
  unmatched, duplicate, bad_shape = [], [], []

  def emit(path, value):
    if expected is not None and path in expected and tuple(value.shape) != tuple(expected[path]):
      bad_shape.append(f"{path}: got {tuple(value.shape)}, expected {tuple(expected[path])}")
      return
    if path in out or path in stacks and not isinstance(value, dict):
      duplicate.append(path)
    if sink is not None:
      sink(path, value)
      out[path] = None
    else:
      out[path] = value

  for name in names:
    match = None
    for r in table:
      match = r._regex.fullmatch(name)
      if match:
        break
    if match is None:
      if any(p.fullmatch(name) for p in ignore_re):
        report.ignored.append(name)
      else:
        unmatched.append(name)
      continue
    value = r.transform(np.asarray(load(name)))
    values = value if isinstance(value, tuple) else (value,)
    if len(values) != len(r.targets):
      raise MappingError(f"rule {r.source!r} made {len(values)} tensors for {len(r.targets)} targets")
    paths = tuple(t.format(**match.groupdict()) for t in r.targets)
    report.mapped.append((name, paths))
    for path, v in zip(paths, values):
      if r.stack is None:
        emit(path, v)
      else:
        stacks.setdefault(path, {})[int(match.group(r.stack))] = v

  for path in list(stacks):
    parts = stacks.pop(path)
    n = max(parts) + 1
    missing = [i for i in range(n) if i not in parts]
    if expected is not None and path in expected:
      n_expected = expected[path][0]
      missing += [i for i in range(n, n_expected)]
    if missing:
      bad_shape.append(f"{path}: missing stacked entries {missing}")
      continue
    shapes = {i: tuple(v.shape) for i, v in sorted(parts.items())}
    if len(set(shapes.values())) > 1:
      bad_shape.append(f"{path}: stacked entries differ in shape {shapes}")
      continue
    emit(path, np.stack([parts[i] for i in range(n)]))
    del parts

  missing, extra = [], []
  if expected is not None:
    missing = [f"{p}: {tuple(expected[p])}" for p in sorted(set(expected) - set(out))]
    extra = sorted(set(out) - set(expected))
  raise_mismatch("checkpoint does not match the model", [
      ("source tensors no rule maps", unmatched), ("targets written twice", duplicate),
      ("mis-shaped tensors", bad_shape), ("target params no source provides", missing),
      ("targets the model does not have", extra)])
  return out, report


def state_paths(state) -> dict[str, tuple[int, ...]]:
  """{'/'-joined path: shape} for every leaf of an nnx State (abstract or concrete)."""
  from flax import nnx
  flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
  out = {}
  for path, var in flat:
    value = var.get_value() if hasattr(var, "get_value") else var
    out["/".join(str(p) for p in path)] = tuple(value.shape)
  return out


def load_into(module, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes {path: array} into the matching params of an nnx module (dtype of the param kept)."""
  from flax import nnx
  import jax.numpy as jnp
  state = nnx.state(module)
  flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
  for path, var in flat:
    key = "/".join(str(p) for p in path)
    if key in arrays:
      old = var.get_value()
      var.set_value(jnp.asarray(arrays[key], dtype=old.dtype))
  nnx.update(module, state)


def with_prefix(table: Sequence[Rule], target_prefix: str = "", source_prefix: str = "") -> list[Rule]:
  """The same rules under a source-name prefix (literal) and a target-path prefix, e.g. the compressor
  table placed at `model.` -> `compressor/` inside the full Quicksviewer layout."""
  return [Rule(re.escape(source_prefix) + r.source, tuple(target_prefix + t for t in r.targets),
               r.transform, r.stack) for r in table]
