"""Benchmarks of node-services, run by ``make bench`` (``python -m bench``). See README.md."""
