"""Benchmarks, each a script run from the repo root (``python bench/<name>.py``); a package only so they share
``bench._common``."""
