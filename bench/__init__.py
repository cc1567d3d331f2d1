"""Benchmarks: `python -m bench all` (or one part) prints tables and writes bench/RESULTS.md."""
