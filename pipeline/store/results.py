"""One HDF5 file per scan, one row per exposure, written by a single writer in SWMR mode.

Layout (NeXus classes in ``NX_class`` attributes; units in ``units`` attributes; valid
NXcanSAS by pynxtools' validator; docs/results-format.md)::

    /                            attrs default = "entry"
    /entry                       NXentry, canSAS_class SASentry (NXcanSAS 1.1); attrs scan_id,
                                 software versions, default ("line_out" while written, then
                                 the first SASdata group); complete (False until the scan
                                 ended with all its n_exposures in the file: ResultsWriter.close)
      definition, title, run     "NXcanSAS", the scan id (twice)
      config                     the run's PipelineConfig as JSON
      model_card                 the model's card as JSON (architecture, training, hash)
      processing                 the digest of each part the rows depend on, as JSON
                                 (:mod:`pipeline.provenance`; files of earlier versions lack it)
      instrument/                NXinstrument, canSAS_class SASinstrument
        geometry/                NXcollection (a field of the NXinstrument itself would not
                                 be valid NXcanSAS)
          poni                   the PONI file text
          beamline_inn_instrument  the model's instrument (:class:`~pipeline.instrument.Instrument`)
                                 as its JSON file's text; attr sha256 (files of earlier
                                 versions lack it)
      exposures/                 (no NeXus class) per-exposure datasets: who, when, status
      line_out/                  (no NeXus class) per-exposure line-outs, and q_nm (n_q,);
                                 Qdev (n_q,): the q resolution (sd, 1/nm); I_mask (n_q,): True
                                 at the instrument's masked bins, which hold NaN in counts,
                                 counts_sd, I and Idev
        plot/                    NXdata of links to those (attr default of line_out), for viewers
      sasdata_NNNNNN/            written when the scan ends, with the writer's handle: one
                                 NXcanSAS SASdata group per exposure with a line-out (index
                                 NNNNNN): Q, Qdev, I_mask (links), I and Idev (that exposure's
                                 row, copied), I_errors (a link to Idev)
      posterior/                 (no NeXus class) per-exposure posterior draws and summaries

The per-exposure datasets of ``exposures``, ``line_out`` and ``posterior`` (path, dtype,
shape per exposure, fill value, units and attributes) are the table
:data:`~pipeline.store.schema.ROW_DATASETS`, which the writer
(:mod:`pipeline.store.writer`), the readers (:mod:`pipeline.store.reader`) and
docs/results-format.md follow. The rows a block of exposures is given in, and those the
writer adds: :mod:`pipeline.store.rows`.

Failed exposures keep their row: status "failed", the error text, NaN where no value exists.
Each append is flushed, so a reader following the file (SWMR) sees every written exposure.

Example:
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "scan.h5"
    >>> names, units = ("pitch_nm",), ("nm",)
    >>> with ResultsWriter(path, names, units, n_samples=4, q_nm=np.linspace(0.01, 0.4, 512)) as w:
    ...     w.append(ExposureResult(index=0, timestamp=0.0, status="failed", error="bad frame"))
    True
    >>> open_results(path).error.tolist()
    ['bad frame']
"""

from pipeline.store.reader import (
    Completion,
    Results,
    check_resumable,
    check_same_processing,
    latest_posterior,
    open_results,
    read_completion,
    rows_since,
    stored_identities,
    stored_instrument,
    stored_scan_source,
    written_indices,
)
from pipeline.store.rows import ExposureResult, concatenate_rows, result_columns
from pipeline.store.schema import (
    INSTRUMENT_PATH,
    QUANTILE_LEVELS,
    ROW_COLUMNS,
    TEXT_BYTES,
    row_paths,
)
from pipeline.store.writer import (
    CHUNK_BYTES,
    SAMPLES_FILTERS,
    ResultsWriteError,
    ResultsWriter,
    making,
)

__all__ = [
    "CHUNK_BYTES",
    "INSTRUMENT_PATH",
    "QUANTILE_LEVELS",
    "ROW_COLUMNS",
    "SAMPLES_FILTERS",
    "TEXT_BYTES",
    "Completion",
    "ExposureResult",
    "Results",
    "ResultsWriteError",
    "ResultsWriter",
    "check_resumable",
    "check_same_processing",
    "concatenate_rows",
    "latest_posterior",
    "making",
    "open_results",
    "read_completion",
    "result_columns",
    "row_paths",
    "rows_since",
    "stored_identities",
    "stored_instrument",
    "stored_scan_source",
    "written_indices",
]
