"""Benchmarks of belm: ``python -m benchmarks.run [--quick] [--device cpu|cuda]`` writes RESULTS.md."""
