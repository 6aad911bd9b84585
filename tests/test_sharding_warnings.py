"""A param (or a constrained activation) the mesh was meant to split but cannot (the mesh axis does not
divide its dimension) stays replicated; above REPLICATED_WARN_BYTES that is one warning naming the param
(the activation's logical names), its shape and the axis."""

import logging

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from qv_jax.sharding import REPLICATED_WARN_BYTES, axis_rules, constrain, make_mesh, param, state_shardings

RULES = [("rows", None), ("wide", "tensor"), ("split", ("fsdp", "tensor"))]


class Block(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    init = nnx.initializers.zeros
    self.odd = param(init, rngs.params(), (1024, 300), ("rows", "wide"))        # 1.17 MiB, 300 % 8 != 0
    self.even = param(init, rngs.params(), (1024, 304), ("rows", "wide"))       # 304 % 8 == 0
    self.small = param(init, rngs.params(), (16, 300), ("rows", "wide"))        # 18.8 KiB
    self.half = param(init, rngs.params(), (1024, 2, 150), ("rows", "split", None), jnp.float32)


def _shardings(mesh):
  return state_shardings(nnx.state(nnx.eval_shape(lambda: Block(nnx.Rngs(0)))), mesh, RULES)


def test_replicated_large_param_is_one_warning(caplog):
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 8}, jax.devices()[:8])
  assert 1024 * 300 * 4 >= REPLICATED_WARN_BYTES > 16 * 300 * 4
  with caplog.at_level(logging.WARNING, logger="qv_jax.sharding"):
    shardings = _shardings(mesh)
    _shardings(mesh)                              # the same mesh again: no second warning
  messages = [r.getMessage() for r in caplog.records]
  assert shardings.odd.spec == PartitionSpec(None, None) and shardings.even.spec == PartitionSpec(None, "tensor")
  assert len([m for m in messages if "param odd " in m]) == 1, messages
  odd = next(m for m in messages if "param odd " in m)
  assert "[1024, 300]" in odd and "'wide'" in odd and "('tensor',)" in odd and "size 8" in odd
  assert not any("param even" in m or "param small" in m for m in messages), messages


def test_partly_replicated_param_names_the_axis_left_out(caplog):
  mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4}, jax.devices()[:8])
  with caplog.at_level(logging.WARNING, logger="qv_jax.sharding"):
    shardings = _shardings(mesh)
  assert shardings.half.spec == PartitionSpec(None, "fsdp", None)    # 2 % (2·4) != 0: tensor left out
  half = [r.getMessage() for r in caplog.records if "param half " in r.getMessage()]
  assert len(half) == 1 and "('tensor',)" in half[0] and "[1024, 2, 150]" in half[0], half


def test_replicated_large_activation_is_one_warning(caplog):
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 8}, jax.devices()[:8])
  axes = ("activation_rows", "activation_wide")
  rules = RULES + [("activation_rows", None), ("activation_wide", "tensor")]

  def f(odd, even, small, odd_too):
    return [constrain(x, axes) for x in (odd, even, small, odd_too)]

  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((1024, 300), (1024, 304), (16, 300), (2048, 300))]
  with caplog.at_level(logging.WARNING, logger="qv_jax.sharding"), jax.set_mesh(mesh), axis_rules(rules):
    jax.jit(f).trace(*args)
    jax.jit(lambda *a: f(*a)).trace(*args)        # traced again: no second warning
  # one line per (logical name, size, mesh axes): odd_too is the same 300 columns left out
  messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("activation ")]
  assert len(messages) == 1, messages
  assert "[1024, 300]" in messages[0] and "'activation_wide'" in messages[0] and "size 8" in messages[0]
