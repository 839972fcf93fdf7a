"""Helpers shared by tests, importable by agent subprocesses started from the repo root."""
