"""Benchmarks: run one with python -m bench.NAME; see the docstring of each module."""
