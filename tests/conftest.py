"""Test set-up: 8 simulated host CPU devices with a large enough XLA:CPU thread pool (set before JAX
starts) and absl flags marked parsed."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU runs each simulated device's collectives as blocking rendezvous on one intra-op pool of
# max(cores, devices) threads; a device can hold several (one per loop body issuing collectives), so on a
# loaded host the pool can fill with waiters whose peers have no thread left: a deadlock (issue #11,
# docs/context.md). 256 threads (XLA's cap) keep one free; context_util.check_collective_threads checks it.
os.environ.setdefault("PJRT_NPROC", "256")

import absl.flags  # noqa: E402

absl.flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
