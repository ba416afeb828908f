"""msflow_fast benchmarks: ``python -m benchmarks.run --help``."""
