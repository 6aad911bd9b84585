"""Test set-up: 8 simulated host CPU devices (set before JAX starts) and absl flags marked parsed."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()
# Collectives between the simulated devices are threads of one process; on 2 loaded cores a rendezvous can
# wait longer than XLA:CPU's default before it aborts the whole process (and with it a pytest-xdist worker).
for _flag in ("xla_cpu_collective_call_terminate_timeout_seconds", "xla_cpu_collective_timeout_seconds"):
  if _flag not in _flags:
    _flags += f" --{_flag}=1800"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import absl.flags  # noqa: E402

absl.flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
