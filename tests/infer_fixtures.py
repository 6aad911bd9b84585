"""Shared by the inference tests: the random-weight work directory and scene videos of
`qv_jax.infer.fixtures`, and a one-device mesh."""

import jax

from qv_jax.infer.fixtures import make_video, make_workdir  # noqa: F401


def one_device_mesh():
  from qv_jax.sharding import make_mesh
  return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
