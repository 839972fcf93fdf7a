"""Benchmarks against real components; each prints JSON lines on stdout."""
