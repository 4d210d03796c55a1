"""Benchmarks: AIOS against agents calling the model themselves."""
