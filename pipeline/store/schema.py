"""The per-exposure datasets of a results file, as one table: :data:`ROW_DATASETS`.

Each row of the table is one dataset that grows by one row per exposure: its column name
(as :class:`~pipeline.store.writer.ResultsWriter` takes it and
:class:`~pipeline.store.reader.Results` gives it), its path in the file's ``entry``, its
dtype, its shape per exposure (by named dimensions, :data:`DIMENSIONS`), the value of a row
that has none, its units and attributes, and what it holds. The writer creates the datasets
from it, the readers find them by it (also in files of earlier versions), a row is complete
when it is in every one of them, and the table in ``docs/results-format.md`` is rendered
from it (:mod:`pipeline.store.format_doc`).

Example:
    >>> DATASETS_BY_NAME["samples"].path
    'posterior/samples'
    >>> DATASETS_BY_NAME["samples"].shape({"samples": 1000, "parameters": 5})
    (1000, 5)
    >>> TEXT_BYTES["status"], ROW_COLUMNS[:3]
    (8, ('index', 'timestamp', 'received_time'))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pipeline.physics.quality import Z_THRESHOLD

#: The levels of ``posterior/quantiles``.
QUANTILE_LEVELS = (0.05, 0.5, 0.95)
#: The two solutions of the width that give the same line-out (``posterior/width_mode_fractions``).
WIDTH_MODES = ("narrow: width < pitch / 2", "wide: width > pitch / 2")
#: Where a results file's entry holds the instrument the model was made for, as JSON text.
INSTRUMENT_PATH = "instrument/geometry/beamline_inn_instrument"
#: Units of the times of a row: s since the epoch.
EPOCH_SECONDS = "s since 1970-01-01T00:00:00Z"

#: The dimensions of a row (what each axis after the exposures' runs over).
DIMENSIONS = {
    "q": "the line-out's q bins (`line_out/q_nm`; 512 for the bundled models)",
    "parameters": "the model's parameters (attr `parameter_names`; 5)",
    "samples": "posterior draws stored per exposure (`inference.n_samples`, 1,000 by default; "
    "or the first `store.stored_samples` of them, 0 for the summaries alone)",
    "levels": f"quantile levels (attr `levels`: {', '.join(map(str, QUANTILE_LEVELS))})",
    "modes": "the width's two solutions (attr `modes`): narrow and wide lines",
}
#: Sizes of the dimensions that are the same in every file.
FIXED_SIZES = {"levels": len(QUANTILE_LEVELS), "modes": len(WIDTH_MODES)}


@dataclass(frozen=True)
class RowDataset:
    """One per-exposure dataset: shape ``(exposures, *row)``, grown by the writer.

    A dataset whose row runs over the parameters carries the attributes ``parameter_names``
    and ``units`` (one per parameter) instead of one ``units``.

    >>> row = RowDataset("sd", "posterior/sd", "float32", ("parameters",), np.nan, None, "sd")
    >>> row.shape({"parameters": 5}), row.group, row.attributes_for(("pitch_nm",), ("nm",))
    ((5,), 'posterior', {'parameter_names': ['pitch_nm'], 'units': ['nm']})
    """

    #: the column's name (:data:`ROW_COLUMNS`, :class:`~pipeline.store.reader.Results`)
    name: str
    #: the dataset's path in the entry
    path: str
    #: its NumPy dtype: a number, or ``S<bytes>`` for fixed-length UTF-8 text
    dtype: str
    #: the dimensions of one exposure's row (:data:`DIMENSIONS`), () for a scalar
    dimensions: tuple[str, ...]
    #: the value of a row (or an element) that has none
    fill: float | int | bytes
    #: its ``units`` attribute (``None``: none, or one per parameter)
    units: str | None
    #: what it holds, for docs/results-format.md
    description: str
    #: given to the writer (a column of :data:`ROW_COLUMNS`), else computed by it
    given: bool = True
    #: read into :class:`~pipeline.store.reader.Results` by ``open_results``
    read: bool = True
    #: a 0/1 flag, read as bool
    boolean: bool = False
    #: compressed as :attr:`pipeline.config.StoreConfig.samples_compression` says
    compressible: bool = False
    #: absent in files of earlier versions (read there as rows of its fill value)
    added_later: bool = False
    #: its path in files of earlier versions, where it was renamed since
    former_path: str | None = None
    #: further attributes, in the order they are written (a tuple: written as a list)
    attributes: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.added_later and self.dimensions:  # a reader fills its rows in older files
            raise ValueError(f"{self.name}: only a scalar per exposure may be added later")

    @property
    def group(self) -> str:
        """The group of the entry the dataset is in."""
        return self.path.split("/")[0]

    @property
    def per_parameter(self) -> bool:
        """Whether its row runs over the parameters (attrs ``parameter_names`` and ``units``)."""
        return "parameters" in self.dimensions

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The shape of one exposure's row, given the sizes of the dimensions that vary
        between files (:data:`FIXED_SIZES` holds the rest)."""
        sizes = {**FIXED_SIZES, **sizes}
        return tuple(sizes[dimension] for dimension in self.dimensions)

    def attributes_for(
        self, parameter_names: tuple[str, ...], parameter_units: tuple[str, ...]
    ) -> dict[str, object]:
        """The dataset's HDF5 attributes in a file of these parameters, in writing order."""
        if self.per_parameter:
            units: dict[str, object] = {
                "parameter_names": list(parameter_names),
                "units": list(parameter_units),
            }
        else:
            units = {} if self.units is None else {"units": self.units}
        further = {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in self.attributes
        }
        return units | further


#: Every per-exposure dataset, in the order the writer creates them.
# fmt: off
ROW_DATASETS: tuple[RowDataset, ...] = (
    RowDataset(
        "index", "exposures/index", "int64", (), -1, "dimensionless",
        "exposure index within the scan (unique: a duplicate is dropped); -1 in a row grown "
        "but not yet written",
    ),
    RowDataset(
        "timestamp", "exposures/timestamp", "float64", (), np.nan, EPOCH_SECONDS,
        "acquisition time (a stream's: the detector's own time from its messages, where they "
        "carry it)",
    ),
    RowDataset(
        "received_time", "exposures/received_time", "float64", (), np.nan, EPOCH_SECONDS,
        "when the pipeline took the frame from a live source (a detector's stream); NaN for "
        "archived frames and in files written before 2026-12-05",
        added_later=True,
    ),
    RowDataset(
        "written_time", "exposures/written_time", "float64", (), np.nan, EPOCH_SECONDS,
        "when the writer stored the row",
        given=False, read=False,
    ),
    RowDataset(
        "status", "exposures/status", "S8", (), b"", None,
        '"ok" or "failed"',
    ),
    RowDataset(
        "error", "exposures/error", "S512", (), b"", None,
        'error text of a failed exposure, "" otherwise',
    ),
    RowDataset(
        "source", "exposures/source", "S256", (), b"", None,
        "where the frame came from (file and frame, stream and series)",
    ),
    RowDataset(
        "frame_id", "exposures/frame_id", "S96", (), b"", None,
        "the frame's identity, KEY:FRAME:SIZE:MTIME_NS (below); empty for frames of no file "
        "and in files written before 2026-12-04",
        read=False, added_later=True,
    ),
    RowDataset(
        "processing_key", "exposures/processing_key", "S32", (), b"", None,
        "digest of the processing record the row was made with (below); empty in files "
        "written before 2026-12-04",
        given=False, read=False, added_later=True,
    ),
    RowDataset(
        "truth", "exposures/truth", "float64", ("parameters",), np.nan, None,
        "true parameters of simulated frames (NaN for measured ones)",
    ),
    RowDataset(
        "counts", "line_out/counts", "float32", ("q",), np.nan, "counts",
        "photon counts per bin (what the model sees); NaN in masked bins",
    ),
    RowDataset(
        "counts_sd", "line_out/counts_sd", "float32", ("q",), np.nan, "counts",
        "sqrt(max(counts, 1)); NaN in masked bins",
        read=False,
    ),
    RowDataset(
        "normalization", "line_out/normalization", "float64", (), np.nan, "arbitrary",
        "monitor x transmission: the product of the configured metadata, 1 if none",
    ),
    RowDataset(
        "samples", "posterior/samples", "float32", ("samples", "parameters"), np.nan, None,
        "posterior draws, not compressed by default (below)",
        compressible=True,
    ),
    RowDataset(
        "mean", "posterior/mean", "float32", ("parameters",), np.nan, None,
        "posterior mean",
    ),
    RowDataset(
        "sd", "posterior/sd", "float32", ("parameters",), np.nan, None,
        "posterior standard deviation",
    ),
    RowDataset(
        "quantiles", "posterior/quantiles", "float32", ("levels", "parameters"), np.nan, None,
        "posterior quantiles at the levels of attr levels",
        attributes=(("levels", QUANTILE_LEVELS),),
    ),
    RowDataset(
        "predictive_z", "posterior/predictive_z", "float32", (), np.nan, "dimensionless",
        "posterior-predictive check (docs/model.md#quality-flag...): near 0 when the grating "
        "model explains the line-out",
    ),
    RowDataset(
        # a name ending in "_weights" is reserved in NeXus (the weights of a field "width_mode")
        "width_mode_weights", "posterior/width_mode_fractions", "float32", ("modes",), np.nan,
        "dimensionless",
        "fractions of draws in the narrow-line and the wide-line solution, which give the "
        "same line-out",
        former_path="posterior/width_mode_weights",
        attributes=(("modes", WIDTH_MODES),),
    ),
    RowDataset(
        "flagged", "posterior/flagged", "uint8", (), 0, "dimensionless",
        "1 when predictive_z > attr z_threshold: the line-out is not explained by a grating",
        given=False, boolean=True,
        attributes=(
            ("z_threshold", Z_THRESHOLD),
            ("meaning", "1: the grating model cannot explain the line-out (predictive_z > z_threshold)"),
        ),
    ),
    RowDataset(
        "I", "line_out/I", "float32", ("q",), np.nan, "arbitrary",
        "counts / normalization (NaN in masked bins)",
        given=False, read=False, attributes=(("uncertainties", "Idev"),),
    ),
    RowDataset(
        "Idev", "line_out/Idev", "float32", ("q",), np.nan, "arbitrary",
        "counts_sd / normalization (NaN in masked bins)",
        given=False, read=False,
    ),
)
# fmt: on

#: The per-exposure datasets by column name.
DATASETS_BY_NAME = {dataset.name: dataset for dataset in ROW_DATASETS}
#: The columns a block of exposures is given in (:meth:`ResultsWriter.rows`); the writer
#: adds the others (``written_time``, ``processing_key``: its file's, ``flagged``:
#: predictive_z > Z_THRESHOLD, ``I``, ``Idev``: counts and counts_sd / normalization).
ROW_COLUMNS = tuple(dataset.name for dataset in ROW_DATASETS if dataset.given)
#: Per-exposure text fields, as fixed-length UTF-8 (bytes): HDF5's SWMR does not support
#: variable-length data (a reader following the file meets "bad heap index" errors). Longer
#: text is cut, ending in "...".
TEXT_BYTES = {
    dataset.name: np.dtype(dataset.dtype).itemsize
    for dataset in ROW_DATASETS
    if np.dtype(dataset.dtype).kind == "S"
}


def row_paths(name: str) -> tuple[str, ...]:
    """Where the per-exposure dataset of column ``name`` may be in a results file's entry:
    its path, then its path in files of earlier versions.

    >>> row_paths("width_mode_weights")
    ('posterior/width_mode_fractions', 'posterior/width_mode_weights')
    """
    dataset = DATASETS_BY_NAME[name]
    return (dataset.path,) if dataset.former_path is None else (dataset.path, dataset.former_path)
