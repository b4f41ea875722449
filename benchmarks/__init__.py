"""Benchmarks of beamline-inn. Each module runs with ``python -m benchmarks.NAME`` and writes
JSON into ``benchmarks/results/``; the figures are summarised in ``docs/``."""
