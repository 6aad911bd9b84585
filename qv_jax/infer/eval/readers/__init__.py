"""Benchmark readers, each for its published on-disk layout: `read(data_dir, ...) -> ReadResult`."""

from qv_jax.infer.eval.readers import mlvu, mvbench, videomme

READERS = {"videomme": videomme.read, "mvbench": mvbench.read, "mlvu": mlvu.read}
