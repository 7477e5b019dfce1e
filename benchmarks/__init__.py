"""Benchmarks (pytest-benchmark) and the results-file writer; see shared/BENCHMARKS.md."""
