"""Benchmark evaluation (Video-MME, MVBench, MLVU): readers, answer extraction, metrics, the resumable
sharded harness and the `qv-eval` command. See docs/evaluation.md."""
