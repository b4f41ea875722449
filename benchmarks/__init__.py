"""Benchmarks of beamline-inn. Each module runs with ``python -m benchmarks.NAME`` and writes
JSON into ``benchmarks/results/``; the figures are summarised in ``docs/``."""

import pipeline  # noqa: F401  (first: it sets the OpenMP wait policy before pyFAI loads)
