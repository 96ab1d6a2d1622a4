"""Runnable experiments: python -m benchmarks continual|net2net|speed."""
