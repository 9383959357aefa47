"""Benchmarks of the pipeline against the lecture's algorithm: `python -m benchmarks.run`."""
