"""The per-scan HDF5 results file (:mod:`pipeline.store.results`)."""

from pipeline.store.inputs import read_line_outs
from pipeline.store.integrity import DamagedResultsError, open_for_reading
from pipeline.store.nxcansas import SasCurve, read_nxcansas
from pipeline.store.results import (
    Completion,
    ExposureResult,
    Results,
    ResultsWriteError,
    ResultsWriter,
    latest_posterior,
    open_results,
    read_completion,
    rows_since,
)

__all__ = [
    "Completion",
    "DamagedResultsError",
    "ExposureResult",
    "Results",
    "ResultsWriteError",
    "ResultsWriter",
    "SasCurve",
    "latest_posterior",
    "open_for_reading",
    "open_results",
    "read_completion",
    "read_line_outs",
    "read_nxcansas",
    "rows_since",
]
