"""Runnable experiments: python -m net2grow.benchmarks continual|net2net|speed."""
