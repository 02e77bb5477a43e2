"""Benchmark scripts, run from the repo root as `python -m benchmarks.NAME` (results: BENCHMARKS.md,
an index of docs/benchmarks/)."""
