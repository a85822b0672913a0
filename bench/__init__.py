"""Benchmarks run by `make bench`; each module is runnable as `python -m bench.<name>`."""
