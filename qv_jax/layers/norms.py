"""LayerNorm and RMSNorm, computed in fp32 and cast back to the input dtype."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qv_jax.sharding import param


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float) -> jax.Array:
  """LayerNorm over the last axis in fp32 (PyTorch semantics: biased variance, eps inside the sqrt),
  returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis (PyTorch semantics: biased variance, eps inside the sqrt)."""

  def __init__(self, features: int, *, eps: float, axis_name: str | None = "embed",
               use_bias: bool = True, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(nnx.initializers.ones, rngs.params(), (features,), (axis_name,), param_dtype)
    self.bias = (param(nnx.initializers.zeros, rngs.params(), (features,), (axis_name,), param_dtype)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    bias = self.bias.get_value() if self.bias is not None else None
    return layer_norm(x, self.scale.get_value(), bias, self.eps)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis: x / sqrt(mean(x²) + eps) · scale (Qwen2 / Llama)."""

  def __init__(self, features: int, *, eps: float, axis_name: str | None = "embed",
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(nnx.initializers.ones, rngs.params(), (features,), (axis_name,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return (y * self.scale.get_value().astype(jnp.float32)).astype(x.dtype)
