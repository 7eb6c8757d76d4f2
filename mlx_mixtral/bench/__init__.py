"""Measuring this package on a machine: accounting.py (what a decode step reads and dispatches,
from the traced graph) and timing.py (tok/s, the bandwidth roofline). `mlx-mixtral bench` is
cli/bench.py; benchmarks/ builds on both."""
