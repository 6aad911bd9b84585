"""Test set-up: 8 simulated host CPU devices (set before JAX starts) and absl flags marked parsed."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import absl.flags  # noqa: E402

absl.flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
