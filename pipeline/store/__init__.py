"""The per-scan HDF5 results file (:mod:`pipeline.store.results`)."""

from pipeline.store.inputs import read_line_outs
from pipeline.store.results import ExposureResult, Results, ResultsWriter, read_results

__all__ = ["ExposureResult", "Results", "ResultsWriter", "read_line_outs", "read_results"]
