"""Benchmarks: `python -m bench.<name>` each, `python -m bench` runs them all."""
