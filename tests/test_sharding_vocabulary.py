"""The sharding vocabulary: params carry weight names, activations `activation_*` names, no name is both,
and the activation rules shard every constrained activation exactly as the one shared table did before
(`LEGACY_RULES`: `LOGICAL_AXIS_RULES` before the split, where activations used the weight names)."""

import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs.quicksviewer import get_config
from context_util import long_video_config
from qv_jax import sharding
from qv_jax.config import validate
from qv_jax.config.mesh import ACTIVATION_AXIS_RULES, LOGICAL_AXIS_RULES, WEIGHT_AXIS_RULES
from qv_jax.model.compressors.registry import KINDS
from qv_jax.model.decoder import Decoder
from qv_jax.model.quicksviewer import Quicksviewer
from qv_jax.train.compile import abstract_batch, jit_train_step
from qv_jax.train.state import train_state_spec
from qv_jax.train.step import make_train_step
from test_train_util import tiny_config

PREFIX = sharding.ACTIVATION_PREFIX
LEGACY_RULES = (
    ("batch", ("data", "fsdp")), ("context_batch", ("data", "fsdp", "context")), ("embed", "fsdp"),
    ("vision_embed", "fsdp"), ("mlp", "tensor"), ("vision_mlp", "tensor"), ("heads", "tensor"),
    ("kv_heads", "tensor"), ("vocab", "tensor"), ("head_dim", None), ("kv", None), ("queries", None),
    ("frames", "context"), ("tokens", None), ("cubes", None), ("layers", None), ("length", "context"),
    ("channels", None),
)
MESHES = [dict(data=1, fsdp=8, context=1, tensor=1), dict(data=2, fsdp=2, context=1, tensor=2),
          dict(data=1, fsdp=2, context=2, tensor=2)]


def _param_names() -> set:
  names = set()
  for kind in KINDS:
    c = get_config("size=tiny,stage=1")
    c.model.compressor.kind = kind
    c = validate(c)
    state = nnx.state(nnx.eval_shape(lambda c=c: Quicksviewer(c.model, max_seq_len=c.data.max_seq_len,
                                                             rngs=nnx.Rngs(0))))
    for _, var in nnx.to_flat_state(state):
      names.update(a for a in var.get_metadata().get("logical_axes") or () if a is not None)
  return names


class Recorder:
  """Every `logical_to_pspec` call (wherever imported) with the rules then current."""

  def __init__(self, monkeypatch):
    self.calls, orig = [], sharding.logical_to_pspec

    def record(axes, rules=None, mesh=None, shape=None, dropped=None):
      spec = orig(axes, rules, mesh, shape, dropped)
      table = sharding.with_activation_rules(rules) if rules is not None else sharding.current_rules()
      self.calls.append((tuple(axes or ()), dict(table), mesh, None if shape is None else tuple(shape), spec))
      return spec

    for module in list(sys.modules.values()):
      if getattr(module, "__dict__", {}).get("logical_to_pspec") is orig:
        monkeypatch.setattr(module, "logical_to_pspec", record)


def _legacy_table(table: dict) -> dict:
  """LEGACY_RULES with the activation entries a caller overrode (context_vision's frame rows) applied."""
  if not table:
    return {}
  default, legacy = dict(LOGICAL_AXIS_RULES), dict(LEGACY_RULES)
  for name, rule in table.items():
    if name.startswith(PREFIX) and rule != default.get(name):
      legacy[name[len(PREFIX):]] = rule
  return legacy


def _trace_train_step(sizes: dict):
  c = long_video_config(bucket=16, max_frames=16, seq_len=128, batch=4) if sizes["context"] > 1 else \
      tiny_config(1, batch_size=8)
  for axis, size in sizes.items():
    c.mesh[axis] = size
  c = validate(c)
  mesh = sharding.make_mesh(c.mesh)
  with jax.set_mesh(mesh), sharding.axis_rules(c.sharding_rules):
    state, spec = train_state_spec(c, mesh)
    batch = abstract_batch(c, mesh)
    yield
    jit_train_step(make_train_step(spec.graphdef, c, spec.tx), spec,
                   {k: v.sharding for k, v in batch.items()}).trace(state, batch)


def _trace_decode(sizes: dict):
  c = validate(get_config("size=tiny,stage=1"))
  mesh = sharding.make_mesh(sizes)
  with jax.set_mesh(mesh), sharding.axis_rules(c.sharding_rules):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(c.model.decoder, rngs=nnx.Rngs(0))))
    yield

    def decode(state):
      decoder = nnx.merge(graphdef, state)
      cache = decoder.init_cache(8, 16)
      ids = jnp.zeros((8, 4), jnp.int32)
      return decoder(input_ids=ids, positions=jnp.zeros((8, 4), jnp.int32), mask=jnp.ones((8, 4), bool),
                     cache=cache)
    jax.eval_shape(decode, state)


@pytest.fixture(scope="module")
def activation_calls():
  """The recorded calls while tracing the train step on three meshes and a cached decode step."""
  calls = []
  with pytest.MonkeyPatch.context() as mp:
    for sizes in MESHES:
      for trace in (_trace_train_step(sizes), _trace_decode(sizes)):
        next(trace)                                   # state and batch built: params are not recorded
        recorder = Recorder(mp)
        next(trace, None)
        calls += recorder.calls
        mp.undo()
  return calls


def test_rules_table_separates_weight_and_activation_names():
  weights, activations = dict(WEIGHT_AXIS_RULES), dict(ACTIVATION_AXIS_RULES)
  assert len(weights) == len(WEIGHT_AXIS_RULES) and len(activations) == len(ACTIVATION_AXIS_RULES)
  assert all(n.startswith(PREFIX) for n in activations) and not any(n.startswith(PREFIX) for n in weights)
  assert not set(weights) & set(activations)
  params = _param_names()
  assert params <= set(weights), params - set(weights)
  assert not params & set(activations)


def test_activations_use_only_activation_names(activation_calls):
  names = {n for axes, *_ in activation_calls for n in axes if n is not None}
  assert names <= set(dict(ACTIVATION_AXIS_RULES)), names - set(dict(ACTIVATION_AXIS_RULES))
  assert not names & _param_names()
  # the layouts of the decoder, tower, resampler, context split and KV cache were all seen
  assert {"activation_batch", "activation_length", "activation_embed", "activation_heads", "activation_mlp",
          "activation_kv_heads", "activation_vocab", "activation_frames", "activation_cubes",
          "activation_context_batch", "activation_layers", "activation_vision_embed"} <= names


def test_activation_specs_are_those_of_the_shared_table(activation_calls):
  checked = 0
  for axes, table, mesh, shape, spec in activation_calls:
    legacy = tuple(None if n is None else n[len(PREFIX):] for n in axes)
    want = sharding.logical_to_pspec(legacy, tuple(_legacy_table(table).items()), mesh, shape)
    assert spec == want, (axes, shape, dict(mesh.shape) if mesh is not None else None, spec, want)
    checked += any(s is not None for s in spec)
  assert checked > 50                                  # many of them really are sharded


def test_a_table_without_activation_names_shards_activations_as_before():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, context=1, tensor=2))
  for axes in (sharding.HIDDEN_AXES, sharding.QUERY_AXES, sharding.LOGIT_AXES, sharding.MLP_AXES):
    new = sharding.logical_to_pspec(axes, None, mesh, (8, 16, 4, 8)[:len(axes)])
    assert sharding.logical_to_pspec(axes, LEGACY_RULES, mesh, (8, 16, 4, 8)[:len(axes)]) == new
    with sharding.axis_rules(LEGACY_RULES):
      assert sharding.logical_to_pspec(axes, None, mesh, (8, 16, 4, 8)[:len(axes)]) == new


def test_activation_sharding_changes_without_touching_the_weights():
  """Sequence parallelism as a rules change: `activation_embed` over tensor, the weights as they were."""
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, context=1, tensor=2))
  rules = tuple((n, "tensor" if n == "activation_embed" else r) for n, r in LOGICAL_AXIS_RULES)
  c = validate(get_config("size=tiny,stage=1"))
  state = nnx.state(nnx.eval_shape(lambda: Decoder(c.model.decoder, rngs=nnx.Rngs(0))))
  specs = lambda r: [s.spec for s in jax.tree.leaves(sharding.state_shardings(state, mesh, r))]  # noqa: E731
  assert specs(rules) == specs(LOGICAL_AXIS_RULES)
  assert sharding.logical_to_pspec(sharding.HIDDEN_AXES, rules, mesh, (8, 16, 64))[2] == "tensor"
  assert sharding.logical_to_pspec(sharding.HIDDEN_AXES, None, mesh, (8, 16, 64))[2] is None   # fsdp: batch
