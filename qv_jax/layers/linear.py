"""Dense layer with logically named parameters."""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from qv_jax.sharding import param

default_kernel_init = nnx.initializers.lecun_normal()


class Dense(nnx.Module):
  """y = x @ kernel (+ bias). kernel [in, out] tagged `axes`; bias [out] tagged `axes[-1]`.

  Params are stored in `param_dtype`; the matmul runs in `dtype` (inputs and kernel cast), accumulating
  in fp32 on TPU/GPU.
  """

  def __init__(self, in_features: int, out_features: int, *, axes: Sequence[str | None],
               use_bias: bool = True, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               kernel_init=default_kernel_init, bias_init=nnx.initializers.zeros, rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.kernel = param(kernel_init, rngs.params(), (in_features, out_features), tuple(axes), param_dtype)
    self.bias = (param(bias_init, rngs.params(), (out_features,), (axes[-1],), param_dtype)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.matmul(x.astype(self.dtype), self.kernel.get_value().astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias.get_value().astype(self.dtype)
    return y
