"""Benchmarks: ``python -m bench`` runs each ``bench/<name>.py``; ``python -m bench.<name>`` one."""
