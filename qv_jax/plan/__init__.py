"""Ahead-of-time planning: compile the real steps for a TPU topology from a CPU host and read memory,
FLOPs and collective traffic from the compiled program (see docs/planner.md)."""
