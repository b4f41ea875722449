"""The per-scan HDF5 results file (:mod:`pipeline.store.results`)."""

from pipeline.store.inputs import read_line_outs
from pipeline.store.nxcansas import SasCurve, read_nxcansas
from pipeline.store.results import ExposureResult, Results, ResultsWriter, open_results

__all__ = [
    "ExposureResult",
    "Results",
    "ResultsWriter",
    "SasCurve",
    "open_results",
    "read_line_outs",
    "read_nxcansas",
]
