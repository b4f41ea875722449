"""One HDF5 file per scan, one row per exposure, written by a single writer in SWMR mode.

Layout (NeXus classes in ``NX_class`` attributes; units in ``units`` attributes; valid
NXcanSAS by pynxtools' validator)::

    /                            attrs default = "entry"
    /entry                       NXentry, canSAS_class SASentry (NXcanSAS 1.1); attrs scan_id,
                                 software versions, default ("line_out" while written, then
                                 the first SASdata group); complete (False until the scan
                                 ended with all its n_exposures in the file: :meth:`close`)
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
      exposures/                 (no NeXus class) one row per exposure in arrival order
        index, timestamp (acquisition: the detector's time where it says), received_time
        (taken from a live source; NaN for archived frames), status ("ok" | "failed"), error
        (text, empty when ok), written_time
        source                   where the frame came from (file and frame, stream and series)
        frame_id                 the frame's identity, KEY:FRAME:SIZE:MTIME_NS (its file's real
                                 path digest, frame within it, the file's size and mtime;
                                 :mod:`pipeline.sources.identity`), empty for frames of no file
        processing_key           digest of the configuration and model the row was made with
                                 (:mod:`pipeline.provenance`)
        truth                    (exposures, parameters) true values of simulated frames, else NaN
      line_out/                  (no NeXus class) q_nm (512,), counts and counts_sd (exposures,
                                 512), normalization (exposures,): monitor x transmission, and
                                 I, Idev = counts / normalization and its sd (arbitrary units);
                                 Qdev (512,): the q resolution (sd, 1/nm); I_mask (512,): True
                                 at the instrument's masked bins, which hold NaN in counts,
                                 counts_sd, I and Idev
        plot/                    NXdata of links to those (attr default of line_out), for viewers
      sasdata_NNNNNN/            written when the scan ends, with the writer's handle: one
                                 NXcanSAS SASdata group per exposure with a line-out (index
                                 NNNNNN): Q, Qdev, I_mask (links), I and Idev (that exposure's
                                 row, copied), I_errors (a link to Idev)
      posterior/                 (no NeXus class)
        samples                  (exposures, samples, parameters) float32, not compressed
                                 unless asked for (:data:`SAMPLES_FILTERS`); attrs
                                 parameter_names, units
        mean, sd                 (exposures, parameters)
        quantiles                (exposures, 3, parameters); attr levels = 0.05, 0.5, 0.95
        width_mode_fractions     (exposures, 2); predictive_z, flagged (exposures,)

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

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # registers the bitshuffle filter: samples of files that chose it
import numpy as np

from pipeline.instrument import Instrument
from pipeline.physics.quality import Z_THRESHOLD
from pipeline.provenance import ProcessingRecord
from pipeline.store.integrity import DamagedResultsError, open_for_reading
from pipeline.store.nxcansas import add_sasdata_groups

QUANTILE_LEVELS = (0.05, 0.5, 0.95)
#: HDF5 filters of ``posterior/samples`` by :attr:`pipeline.config.StoreConfig.samples_compression`:
#: none (the default: every HDF5 reader opens it), gzip (deflate level 1 with byte shuffle:
#: in every HDF5 build) or bitshuffle + LZ4 (as Eiger detectors write frames: readers need
#: the filter plugin, e.g. ``import hdf5plugin``). Sizes and the writer's speed with each:
#: ``python -m benchmarks.writer``.
SAMPLES_FILTERS: dict[str, dict[str, Any]] = {
    "none": {},
    "gzip": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
    "bitshuffle-lz4": dict(hdf5plugin.Bitshuffle(cname="lz4")),
}
#: Per-exposure text fields, as fixed-length UTF-8 (bytes): HDF5's SWMR does not support
#: variable-length data (a reader following the file meets "bad heap index" errors). Longer
#: text is cut, ending in "...".
TEXT_BYTES = {"status": 8, "error": 512, "source": 256, "frame_id": 96, "processing_key": 32}
#: Where a results file's entry holds the instrument the model was made for, as JSON text.
INSTRUMENT_PATH = "instrument/geometry/beamline_inn_instrument"
#: Bytes (before compression) per HDF5 chunk of the per-exposure arrays: 3 exposures' draws
#: of 1,000 samples, 32 line-outs, up to 1,024 summaries per chunk instead of one.
CHUNK_BYTES = 64 * 1024


def _fixed_text(value: str) -> np.ndarray:
    """A fixed-length UTF-8 string scalar (no global heap, so SWMR readers can read it)."""
    data = value.encode()
    return np.array(data, dtype=f"S{max(1, len(data))}")


def _cut(value: str, length: int) -> bytes:
    data = value.encode()
    return data if len(data) <= length else data[: length - 3] + b"..."


def making(path: Path) -> Path:
    """Where a new results file for ``path`` is made, until it is ready for readers."""
    return Path(path).with_name(Path(path).name + ".creating")


@dataclass
class ExposureResult:
    """What the writer stores for one exposure; arrays are ``None`` where there is no value."""

    index: int
    timestamp: float
    status: str = "ok"
    #: when the pipeline took the frame from a live source, s since the epoch (NaN: archived)
    received_time: float = np.nan
    error: str = ""
    source: str = ""
    #: the frame's identity (:mod:`pipeline.sources.identity`), empty for frames of no file
    frame_id: str = ""
    normalization: float = np.nan
    counts: np.ndarray | None = None
    counts_sd: np.ndarray | None = None
    samples: np.ndarray | None = None
    mean: np.ndarray | None = None
    sd: np.ndarray | None = None
    quantiles: np.ndarray | None = None
    truth: np.ndarray | None = None
    #: the posterior-predictive check's z (:mod:`pipeline.physics.quality`)
    predictive_z: float = np.nan
    #: fractions of draws in the narrow-line and the wide-line solution of the width
    width_mode_weights: np.ndarray | None = None


def _software_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {}
    for package in ("beamline-inn", "numpy", "torch", "pyFAI", "h5py", "pyzmq", "prefect"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


class ResultsWriteError(OSError):
    """The results file could not be written (a full disk, a lost mount); the rows flushed
    before are intact, and the scan can be resumed once the cause is removed."""


class ResultsWriter:
    """Appends exposures to a new results file; refuses to overwrite an existing one.

    Exposures whose index was already written are dropped (``append`` returns False), so a
    re-sent exposure appears once.

    With ``resume``, an existing file of the same scan (same scan id, model, samples and q
    grid) is continued instead: its complete rows (:func:`written_indices`; a row the killed
    writer had only begun is dropped) are copied into a new file beside it, which then
    replaces it, and appending goes on there. The copy is needed because a file whose SWMR
    writer was killed cannot be opened for writing again (HDF5 keeps its "open for write"
    flag; only readers in SWMR mode may open it).

    ``chunk_bytes`` sizes the HDF5 chunks of the per-exposure arrays (0: one exposure per
    chunk; scalars are chunked 1,024 exposures per chunk).

    ``instrument``, the model's (its grid of as many bins as ``q_nm``), is stored in the file
    (:data:`INSTRUMENT_PATH`); its masked bins are True in ``line_out/I_mask`` and NaN in
    every row's counts, counts_sd, I and Idev, whatever was sent for them (an integrator gives
    0 counts where no pixel falls). Without it no bin is masked.
    """

    def __init__(
        self,
        path: Path,
        parameter_names: tuple[str, ...],
        parameter_units: tuple[str, ...],
        n_samples: int,
        q_nm: np.ndarray,
        *,
        scan_id: str = "",
        config_json: str = "{}",
        model_card: dict | None = None,
        poni_text: str = "",
        processing: ProcessingRecord | None = None,
        resume: bool = False,
        drop_indices: Collection[int] = (),
        chunk_bytes: int = CHUNK_BYTES,
        samples_compression: str = "none",
        q_resolution_nm: float | None = None,
        instrument: Instrument | None = None,
    ) -> None:
        self.path = Path(path)
        if samples_compression not in SAMPLES_FILTERS:
            raise ValueError(
                f"unknown samples compression {samples_compression!r}: "
                f"one of {', '.join(SAMPLES_FILTERS)}"
            )
        if instrument is not None and instrument.n_points != len(q_nm):
            raise ValueError(
                f"the instrument {instrument.name!r} has {instrument.n_points} q bins, the "
                f"line-outs of {self.path} {len(q_nm)}"
            )
        #: (n_q,) True at the bins the line-outs do not observe: stored as NaN
        self.masked = np.zeros(len(q_nm), bool) if instrument is None else ~instrument.observed
        resuming = self.path.exists()
        if resuming:
            if not resume:
                raise FileExistsError(f"results file already exists: {self.path}")
            check_resumable(
                self.path, scan_id, model_card, n_samples, q_nm, parameter_names, processing
            )
        # Made beside its place and moved there once in SWMR mode: a reader never meets the
        # file while the writer holds it exclusively (HDF5's lock: BlockingIOError).
        target = self.path.with_name(self.path.name + ".resuming") if resuming else making(path)
        target.unlink(missing_ok=True)  # left by a writer killed while it made the file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seen: set[int] = set()
        n_par, n_q = len(parameter_names), len(q_nm)
        # No chunk cache: each row is written once and never read back here; HDF5's default
        # (1 MiB per dataset) grew the writer by 60 MiB in the first 5,000 exposures and
        # made appending 20% slower (soak test, tests/test_reliability.py).
        self.file = h5py.File(target, "w", libver="latest", rdcc_nbytes=0)
        self.file.attrs["default"] = "entry"
        entry = self.file.create_group("entry")
        entry.attrs.update(
            NX_class="NXentry",
            canSAS_class="SASentry",
            version="1.1",
            scan_id=scan_id,
            default="line_out",
        )
        entry.attrs["software"] = json.dumps(_software_versions())
        # Made now, written in place when the scan ends (:meth:`close`): attributes added to
        # a finished file's entry, in SWMR mode, leave its header unreadable once the file's
        # end is lost (salvage).
        entry.attrs["complete"] = False
        entry.attrs["n_exposures"] = np.int64(0)
        self.processing_key = processing.key if processing is not None else ""
        for name in ("definition", "title", "run"):
            value = "NXcanSAS" if name == "definition" else scan_id
            entry.create_dataset(name, data=_fixed_text(value))
        entry.create_dataset("config", data=_fixed_text(config_json))
        entry.create_dataset("model_card", data=_fixed_text(json.dumps(model_card or {})))
        if processing is not None:
            entry.create_dataset("processing", data=_fixed_text(processing.to_json()))
        instrument_group = entry.create_group("instrument")
        instrument_group.attrs.update(NX_class="NXinstrument", canSAS_class="SASinstrument")
        geometry = instrument_group.create_group("geometry")
        geometry.attrs["NX_class"] = "NXcollection"
        geometry.create_dataset("poni", data=_fixed_text(poni_text))
        if instrument is not None:
            stored = entry.create_dataset(INSTRUMENT_PATH, data=_fixed_text(instrument.to_json()))
            stored.attrs["sha256"] = instrument.sha256()

        def growing(
            group: h5py.Group, name: str, shape: tuple, dtype, fill=np.nan, **filters
        ) -> h5py.Dataset:
            return group.create_dataset(
                name,
                shape=(0, *shape),
                maxshape=(None, *shape),
                dtype=dtype,
                chunks=(_chunk_rows(shape, dtype, chunk_bytes), *shape),
                fillvalue=fill,
                **filters,
            )

        # exposures, line_out and posterior have no NeXus class: in an NXcanSAS entry an
        # NXdata group must be a full SASdata, and an NXcollection a SASnote, which the
        # validator (pynxtools) cannot accept; groups without a class are not validated.
        exposures = entry.create_group("exposures")
        line_out = entry.create_group("line_out")
        line_out.attrs["default"] = "plot"
        posterior = entry.create_group("posterior")
        self._datasets = {
            "index": growing(exposures, "index", (), np.int64, -1),
            "timestamp": growing(exposures, "timestamp", (), np.float64),
            "received_time": growing(exposures, "received_time", (), np.float64),
            "written_time": growing(exposures, "written_time", (), np.float64),
            **{
                name: growing(exposures, name, (), f"S{length}", b"")
                for name, length in TEXT_BYTES.items()
            },
            "truth": growing(exposures, "truth", (n_par,), np.float64),
            "counts": growing(line_out, "counts", (n_q,), np.float32),
            "counts_sd": growing(line_out, "counts_sd", (n_q,), np.float32),
            "normalization": growing(line_out, "normalization", (), np.float64),
            "samples": growing(
                posterior,
                "samples",
                (n_samples, n_par),
                np.float32,
                **SAMPLES_FILTERS[samples_compression],
            ),
            "mean": growing(posterior, "mean", (n_par,), np.float32),
            "sd": growing(posterior, "sd", (n_par,), np.float32),
            "quantiles": growing(posterior, "quantiles", (len(QUANTILE_LEVELS), n_par), np.float32),
            "predictive_z": growing(posterior, "predictive_z", (), np.float32),
            "width_mode_weights": growing(posterior, "width_mode_fractions", (2,), np.float32),
            "flagged": growing(posterior, "flagged", (), np.uint8, 0),
            "I": growing(line_out, "I", (n_q,), np.float32),
            "Idev": growing(line_out, "Idev", (n_q,), np.float32),
        }
        #: (row shape, dtype, fill value) of each dataset, read once (h5py reads them anew)
        self._layout = {
            name: (dataset.shape[1:], dataset.dtype, dataset.fillvalue)
            for name, dataset in self._datasets.items()
        }
        self._datasets["I"].attrs.update(units="arbitrary", uncertainties="Idev")
        self._datasets["Idev"].attrs["units"] = "arbitrary"
        q = line_out.create_dataset("q_nm", data=np.asarray(q_nm, dtype=np.float64))
        q.attrs["units"] = "1/nm"
        # the SASdata groups' mask (True: masked): the instrument's masked bins
        line_out.create_dataset("I_mask", data=self.masked)
        self._datasets["index"].attrs["units"] = "dimensionless"
        self._datasets["counts"].attrs["units"] = "counts"
        self._datasets["counts_sd"].attrs["units"] = "counts"
        self._datasets["timestamp"].attrs["units"] = "s since 1970-01-01T00:00:00Z"
        self._datasets["received_time"].attrs["units"] = "s since 1970-01-01T00:00:00Z"
        self._datasets["written_time"].attrs["units"] = "s since 1970-01-01T00:00:00Z"
        for name in ("samples", "mean", "sd", "quantiles", "truth"):
            self._datasets[name].attrs["parameter_names"] = list(parameter_names)
            self._datasets[name].attrs["units"] = list(parameter_units)
        self._datasets["quantiles"].attrs["levels"] = list(QUANTILE_LEVELS)
        self._datasets["normalization"].attrs["units"] = "arbitrary"  # monitor x transmission
        for name in ("predictive_z", "width_mode_weights", "flagged"):
            self._datasets[name].attrs["units"] = "dimensionless"
        self._datasets["width_mode_weights"].attrs["modes"] = [
            "narrow: width < pitch / 2",
            "wide: width > pitch / 2",
        ]
        self._datasets["flagged"].attrs["z_threshold"] = Z_THRESHOLD
        self._datasets["flagged"].attrs["meaning"] = (
            "1: the grating model cannot explain the line-out (predictive_z > z_threshold)"
        )
        if q_resolution_nm is not None:
            q_dev = line_out.create_dataset("Qdev", data=np.full(n_q, q_resolution_nm))
            q_dev.attrs["units"] = "1/nm"
            q.attrs["resolutions"] = "Qdev"
        plot = line_out.create_group("plot")  # every line-out, for NeXus viewers (silx, h5web)
        plot.attrs.update(NX_class="NXdata", signal="counts", axes=[".", "q_nm"])
        for name in ("q_nm", "counts", "normalization", "I", "Idev"):
            plot[name] = line_out[name]
        plot["counts_errors"] = line_out["counts_sd"]
        plot["I_errors"] = line_out["Idev"]
        self.n_rows = 0
        if resuming:
            self._copy_complete_rows(self.path, set(drop_indices))
        self.file.swmr_mode = True  # flushes
        target.replace(self.path)  # the open file moves with its name

    def _copy_complete_rows(self, path: Path, drop: set[int]) -> None:
        """Copy the complete rows of an earlier file of this scan, in blocks of rows, except
        those of the exposure indices in ``drop`` (to be written again)."""
        with open_for_reading(path) as old:
            entry = old["entry"]
            n = _complete_rows(entry)
            index = entry["exposures/index"][:n]
            keep = np.flatnonzero(~np.isin(index, list(drop)))
            for name, dataset in self._datasets.items():
                dataset.resize(keep.size, axis=0)
                source = _row_dataset(entry, name)
                if source is None:  # a file of an earlier version
                    continue
                for start in range(0, keep.size, 1024):
                    rows = keep[start : start + 1024]
                    if rows.size == rows[-1] - rows[0] + 1:  # contiguous: one slice
                        dataset[start : start + rows.size] = source[rows[0] : rows[-1] + 1]
                    else:
                        dataset[start : start + rows.size] = source[rows]
            self._seen = {int(i) for i in index[keep]}
        self.n_rows = int(keep.size)

    def append(self, result: ExposureResult) -> bool:
        """Write one exposure and flush; False if this exposure index was written before."""
        return self.append_many([result])[0]

    def append_many(self, results: list[ExposureResult]) -> list[bool]:
        """Write several exposures as one block of rows and flush once; for each, False if
        its index was written before (or earlier in ``results``)."""
        return self.append_rows(result_columns(results)).tolist()

    def rows(self, columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``columns`` (one value per exposure in each; names from :data:`ROW_COLUMNS`) as
        this file's rows: an array per column in the file's dtype, its fill value where a
        column is missing or a value is ``None``; text cut to its field.

        ``ValueError`` when a column is unknown, has another number of rows than ``index``,
        a row of another shape, or an index is negative: nothing is written then. Cheap on
        its own output (no copies), so a block checked message by message is not converted
        twice.
        """
        unknown = set(columns) - set(ROW_COLUMNS)
        if unknown:
            raise ValueError(f"unknown columns {sorted(unknown)}")
        if "index" not in columns:
            raise ValueError("no 'index' column")
        n = len(columns["index"])
        rows = {}
        for name in ROW_COLUMNS:
            shape, dtype, fill = self._layout[name]
            value = columns.get(name)
            if value is None:
                rows[name] = np.full((n, *shape), fill, dtype=dtype)
            elif dtype.kind == "S":
                rows[name] = _text_column(name, value, n, dtype)
            else:
                rows[name] = _number_column(name, value, n, shape, dtype, fill)
        if (rows["index"] < 0).any():
            raise ValueError("an exposure index is negative")
        return rows

    def append_rows(self, columns: Mapping[str, Any]) -> np.ndarray:
        """Write exposures given as columns (:meth:`rows`) as one block and flush once;
        return for each row whether it was written (False: its index was written before, or
        earlier in the block).

        The cheapest way to store many exposures (each dataset is resized and written once
        per block): the writer process appends the blocks that have arrived together.
        """
        rows = self.rows(columns)
        index = rows["index"].tolist()
        written = np.zeros(len(index), dtype=bool)
        new: set[int] = set()
        for row, exposure in enumerate(index):
            if exposure not in self._seen and exposure not in new:
                new.add(exposure)
                written[row] = True
        n = len(new)
        if n == 0:
            return written
        if n < len(index):
            rows = {name: column[written] for name, column in rows.items()}
        rows |= _derived_columns(rows, time.time(), self.masked)
        rows["processing_key"] = np.full(n, self.processing_key.encode(), dtype="S32")
        first = self.n_rows
        try:
            for name, dataset in self._datasets.items():
                dataset.resize(first + n, axis=0)
                dataset[first : first + n] = rows[name]
            self.file.flush()
        except (OSError, RuntimeError) as error:  # HDF5 reports a failed write as either
            raise ResultsWriteError(f"cannot write {self.path}: {error}") from error
        self._seen.update(new)
        self.n_rows += n
        return written

    def close(self, n_exposures: int | None = None) -> None:
        """Finish the file with this handle, then close it: add one NXcanSAS ``SASdata``
        group per exposure with a line-out (:func:`pipeline.store.nxcansas.add_sasdata_groups`)
        and, given the scan's ``n_exposures`` when it ended, mark the scan complete
        (:func:`read_completion`; ``ValueError``, after the groups are written and the file
        closed, when the file holds another number of rows). Nothing reopens the file, so
        readers (SWMR) may hold it open throughout; :class:`ResultsWriteError` when it
        cannot be written (a full disk: the file is left as the last flush left it)."""
        if not self.file.id.valid:
            return
        entry = self.file["entry"]
        try:
            add_sasdata_groups(entry, self.n_rows)
            if n_exposures is not None and n_exposures == self.n_rows:
                entry.attrs.modify("complete", True)
                entry.attrs.modify("n_exposures", n_exposures)
            self.file.flush()
        except (OSError, RuntimeError) as error:
            raise ResultsWriteError(f"cannot finish {self.path}: {error}") from error
        finally:
            del entry
            # Datasets first: after a failed write (a full disk) the file's close fails, and
            # HDF5 then crashes when it frees a dataset of that file.
            self._datasets.clear()
        self.file.close()
        if n_exposures is not None and n_exposures != self.n_rows:
            raise ValueError(
                f"{self.path} holds {self.n_rows} exposures, not the scan's {n_exposures}: "
                "not marked complete"
            )

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _chunk_rows(shape: tuple, dtype, chunk_bytes: int) -> int:
    """Rows per HDF5 chunk of a growing dataset: 1,024 for a scalar per exposure, else as
    many rows as fit in ``chunk_bytes`` (at least 1, at most 1,024). Small per-exposure
    arrays in chunks of one row cost HDF5 about as much per exposure as the data itself
    (``python -m benchmarks.writer``)."""
    if not shape:
        return 1024
    row_bytes = np.dtype(dtype).itemsize * int(np.prod(shape))
    return max(1, min(1024, chunk_bytes // row_bytes))


#: The columns a block of exposures is given in (:meth:`ResultsWriter.rows`); the writer
#: adds ``written_time``, ``flagged`` (predictive_z > Z_THRESHOLD), ``I``, ``Idev``
#: (counts and counts_sd / normalization) and ``processing_key`` (its file's).
ROW_COLUMNS = (
    "index",
    "timestamp",
    "received_time",
    "status",
    "error",
    "source",
    "frame_id",
    "normalization",
    "truth",
    "counts",
    "counts_sd",
    "samples",
    "mean",
    "sd",
    "quantiles",
    "predictive_z",
    "width_mode_weights",
)


def result_columns(results: list[ExposureResult]) -> dict[str, list]:
    """The columns of ``results`` (lists, ``None`` where a result has no value), for
    :meth:`ResultsWriter.rows`."""
    return {name: [getattr(result, name) for result in results] for name in ROW_COLUMNS}


def concatenate_rows(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Blocks of rows (:meth:`ResultsWriter.rows`) as one block, in order."""
    if len(blocks) == 1:
        return blocks[0]
    return {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}


def _text_column(name: str, values: Any, n: int, dtype: np.dtype) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype == dtype and values.shape == (n,):
        return values
    if isinstance(values, str | bytes) or len(values) != n:
        raise ValueError(f"column {name!r}: expected {n} texts")
    return np.array([_cut("" if v is None else str(v), dtype.itemsize) for v in values], dtype)


def _number_column(
    name: str, values: Any, n: int, shape: tuple, dtype: np.dtype, fill: Any
) -> np.ndarray:
    if isinstance(values, np.ndarray):
        array = values
    else:
        values = list(values)
        if len(values) != n:
            raise ValueError(f"column {name!r}: {len(values)} rows, expected {n}")
        missing = np.full(shape, fill, dtype=dtype)
        rows = [missing if v is None else np.asarray(v) for v in values]
        for row in rows:
            if row.shape != shape:
                raise ValueError(f"column {name!r}: a row of shape {row.shape}, expected {shape}")
        array = np.stack(rows) if rows else np.empty((0, *shape), dtype)
    if array.shape != (n, *shape):
        raise ValueError(f"column {name!r}: shape {array.shape}, expected {(n, *shape)}")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"column {name!r}: dtype {array.dtype} is not a number")
    return array.astype(dtype, copy=False)


def _derived_columns(
    rows: dict[str, np.ndarray], now: float, masked: np.ndarray
) -> dict[str, np.ndarray]:
    """``written_time``, ``flagged``, the line-out with NaN in the ``masked`` bins, and
    divided by its normalization (``I``, ``Idev``; by 1 where the normalization is missing
    or not positive)."""
    normalization = rows["normalization"]
    usable = np.isfinite(normalization) & (normalization > 0)
    scale = np.divide(1.0, normalization, out=np.ones_like(normalization), where=usable)
    scale = scale.astype(np.float32)[:, None]
    counts, counts_sd = rows["counts"], rows["counts_sd"]
    if masked.any():  # new arrays: the rows may be a message's read-only buffers
        counts = np.where(masked, np.float32(np.nan), counts)
        counts_sd = np.where(masked, np.float32(np.nan), counts_sd)
    return {
        "written_time": np.full(len(normalization), now),
        "flagged": (rows["predictive_z"] > Z_THRESHOLD).astype(np.uint8),
        "counts": counts,
        "counts_sd": counts_sd,
        "I": counts * scale,
        "Idev": counts_sd * scale,
    }


#: Where each per-exposure dataset of a results file lives, by :class:`ResultsWriter` name.
_ROW_DATASETS = {
    **{
        name: f"exposures/{name}"
        for name in (
            "index",
            "timestamp",
            "received_time",
            "written_time",
            "status",
            "error",
            "source",
            "frame_id",
            "processing_key",
            "truth",
        )
    },
    **{name: f"line_out/{name}" for name in ("counts", "counts_sd", "normalization", "I", "Idev")},
    **{
        name: f"posterior/{name}"
        for name in (
            "samples",
            "mean",
            "sd",
            "quantiles",
            "predictive_z",
            "flagged",
        )
    },
    # a name ending in "_weights" is reserved in NeXus (the weights of a field "width_mode")
    "width_mode_weights": "posterior/width_mode_fractions",
}


#: Per-exposure datasets that files of earlier versions lack (read as empty there).
_ADDED_LATER = frozenset(
    {"exposures/frame_id", "exposures/processing_key", "exposures/received_time"}
)
#: Per-exposure datasets renamed since: their path in files of earlier versions.
_FORMER_PATHS = {"posterior/width_mode_fractions": "posterior/width_mode_weights"}


def row_paths(name: str) -> tuple[str, ...]:
    """Where the per-exposure dataset of column ``name`` may be in a results file's entry:
    its path, then its path in files of earlier versions."""
    path = _ROW_DATASETS[name]
    return (path, _FORMER_PATHS[path]) if path in _FORMER_PATHS else (path,)


def _row_dataset(entry: h5py.Group, name: str) -> h5py.Dataset | None:
    """The per-exposure dataset of column ``name`` (:func:`row_paths`); ``None`` in a file
    of an earlier version that has none."""
    for path in row_paths(name):
        if path in entry:
            return entry[path]
    return None


def _complete_rows(entry: h5py.Group) -> int:
    """Rows written to every per-exposure dataset (a killed writer may have grown some)."""
    datasets = {name: _row_dataset(entry, name) for name in _ROW_DATASETS}
    missing = [_ROW_DATASETS[name] for name, dataset in datasets.items() if dataset is None]
    if set(missing) - _ADDED_LATER:
        raise ValueError(f"not a results file of this version: no {', '.join(missing)}")
    return min(dataset.shape[0] for dataset in datasets.values() if dataset is not None)


def stored_identities(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The exposure index, whether it failed, and the frame identity (empty where none) of
    each complete row of a results file (also of one whose writer was killed)."""
    with open_for_reading(path) as handle:
        entry = handle["entry"]
        n = _complete_rows(entry)
        index = entry["exposures/index"][:n]
        failed = entry["exposures/status"][:n] != b"ok"
        frame_ids = (
            [text.decode(errors="replace") for text in entry["exposures/frame_id"][:n]]
            if "exposures/frame_id" in entry
            else [""] * n
        )
    written = index >= 0
    return (
        index[written],
        failed[written],
        [t for t, w in zip(frame_ids, written, strict=True) if w],
    )


def written_indices(path: Path) -> set[int]:
    """Exposure indices of the complete rows of a results file, also of one whose writer was
    killed (read in SWMR mode)."""
    with open_for_reading(path) as handle:
        entry = handle["entry"]
        return {int(i) for i in entry["exposures/index"][: _complete_rows(entry)]}


def check_resumable(
    path: Path,
    scan_id: str,
    model_card: dict | None,
    n_samples: int,
    q_nm: np.ndarray,
    parameter_names: tuple[str, ...],
    processing: ProcessingRecord | None = None,
) -> None:
    """ValueError unless ``path`` is a results file of this scan, model, samples and grid,
    and (where both have a processing record) the same configuration."""
    try:
        handle = open_for_reading(path)
    except DamagedResultsError:
        raise  # it says how to salvage the file
    except OSError as error:
        raise ValueError(f"cannot resume {path}: unreadable ({error}); move it away") from error
    with handle:
        entry = handle["entry"]
        _complete_rows(entry)
        card = json.loads(entry["model_card"][()].decode())
        differences = {
            "scan id": (str(entry.attrs["scan_id"]), scan_id),
            "model": (card.get("weights_sha256"), (model_card or {}).get("weights_sha256")),
            "samples per exposure": (entry["posterior/samples"].shape[1], n_samples),
            "parameters": (
                tuple(entry["posterior/samples"].attrs["parameter_names"]),
                tuple(parameter_names),
            ),
        }
        their_q = entry["line_out/q_nm"][()]
        their_processing = _processing_of(entry)
    if processing is not None and their_processing is not None:
        check_same_processing(path, their_processing, processing)
    theirs, ours = differences.pop("scan id")
    if theirs != ours:
        raise ValueError(
            f"cannot resume {path}: it holds scan {theirs!r}, not {ours!r} (a results file is "
            f"OUT/SCAN_ID.h5: to complete it, move it to {path.with_name(theirs + '.h5')} and "
            f"resume with --scan-id {theirs})"
        )
    for what, (theirs, ours) in differences.items():
        if theirs != ours:
            raise ValueError(f"cannot resume {path}: its {what} is {theirs!r}, this run's {ours!r}")
    if their_q.shape != np.shape(q_nm) or not np.allclose(their_q, q_nm):
        raise ValueError(f"cannot resume {path}: its q grid differs from this run's")


def _processing_of(entry: h5py.Group) -> ProcessingRecord | None:
    if "processing" not in entry:
        return None
    return ProcessingRecord.from_json(entry["processing"][()].decode())


def stored_scan_source(path: Path) -> str | None:
    """The archived scan a results file belongs to (its configuration's ``scan_source``);
    ``None`` when it names none or cannot be read."""
    try:
        with open_for_reading(path) as handle:
            config = json.loads(handle["entry/config"][()].decode())
    except (OSError, KeyError, ValueError):
        return None
    source = config.get("scan_source")
    return None if source is None else str(source)


def check_same_processing(path: Path, theirs: ProcessingRecord, ours: ProcessingRecord) -> None:
    """``ValueError`` in one line, naming what differs, when the rows of ``path`` were made
    with another configuration or model than this run's: they must not mix."""
    differences = theirs.differences(ours)
    if differences:
        verb = "differs" if len(differences) == 1 else "differ"
        raise ValueError(
            f"cannot resume {path}: its {' and '.join(differences)} {verb} from this run's; "
            "write a new results file (another --scan-id or --out) instead"
        )


@dataclass(frozen=True)
class Completion:
    """What a finished scan's results file says of itself (:meth:`ResultsWriter.close`)."""

    n_exposures: int
    model_sha256: str
    n_samples: int


def read_completion(path: Path) -> Completion | None:
    """The :class:`Completion` of a results file its scan finished; ``None`` when the file
    is missing, unfinished (say, its writer was killed) or unreadable."""
    if not Path(path).is_file():
        return None
    try:
        with open_for_reading(path) as handle:
            entry = handle["entry"]
            if not entry.attrs.get("complete", False):
                return None
            card = json.loads(entry["model_card"][()].decode())
            return Completion(
                n_exposures=int(entry.attrs["n_exposures"]),
                model_sha256=str(card.get("weights_sha256", "")),
                n_samples=int(entry["posterior/samples"].shape[1]),
            )
    except (OSError, KeyError, ValueError):
        return None


def latest_posterior(path: Path, look_back: int = 64) -> tuple[int, np.ndarray] | None:
    """The exposure index and posterior samples (samples, parameters) of the newest
    successful row among the last ``look_back`` of a results file, also of one being written
    (SWMR); ``None`` when there is none yet."""
    with open_for_reading(path) as handle:
        entry = handle["entry"]
        n = _complete_rows(entry)
        first = max(0, n - look_back)
        status = entry["exposures/status"][first:n]
        ok = np.flatnonzero(status == b"ok")
        if ok.size == 0:
            return None
        row = first + int(ok[-1])
        return int(entry["exposures/index"][row]), entry["posterior/samples"][row]


@dataclass
class Results:
    """A results file read into memory; rows sorted by exposure index."""

    scan_id: str
    parameter_names: tuple[str, ...]
    parameter_units: tuple[str, ...]
    q_nm: np.ndarray
    index: np.ndarray
    timestamp: np.ndarray
    #: when the pipeline took each frame from a live source (NaN: archived, or a file of an
    #: earlier version)
    received_time: np.ndarray
    status: np.ndarray
    error: np.ndarray
    source: np.ndarray
    truth: np.ndarray
    counts: np.ndarray
    normalization: np.ndarray
    samples: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    quantiles: np.ndarray
    predictive_z: np.ndarray
    flagged: np.ndarray
    width_mode_weights: np.ndarray
    config_json: str
    model_card: dict
    #: the instrument the model was made for (``None``: a file of an earlier version)
    instrument: Instrument | None = None


def stored_instrument(entry: h5py.Group) -> Instrument | None:
    """The instrument a results file's ``entry`` holds (:data:`INSTRUMENT_PATH`); ``None``
    in files written before it was stored."""
    if INSTRUMENT_PATH not in entry:
        return None
    return Instrument.model_validate_json(entry[INSTRUMENT_PATH][()].decode())


def open_results(path: Path) -> Results:
    """Read a results file (also one still being written, through SWMR); ``ValueError`` for
    an HDF5 file that is not one (say, an NXcanSAS file from elsewhere)."""
    with open_for_reading(path) as handle:
        entry = handle.get("entry")
        if not (isinstance(entry, h5py.Group) and isinstance(entry.get("posterior"), h5py.Group)):
            raise ValueError(
                f"{path} is not a beamline-inn results file (no entry/posterior): its top "
                f"level holds {', '.join(sorted(handle)) or 'nothing'}"
            )
        # A file being written can show its datasets grown to different lengths, and rows
        # grown but not yet written (index = -1): only rows complete in every dataset count.
        n = _complete_rows(entry)
        index = entry["exposures/index"][:n]
        written = np.flatnonzero(index >= 0)
        order = written[np.argsort(index[written], kind="stable")]
        samples = entry["posterior/samples"]
        fractions = _row_dataset(entry, "width_mode_weights")
        assert fractions is not None  # _complete_rows found every per-exposure dataset

        def rows(name: str) -> np.ndarray:
            return entry[name][:n][order]

        return Results(
            scan_id=str(entry.attrs["scan_id"]),
            parameter_names=tuple(samples.attrs["parameter_names"]),
            parameter_units=tuple(samples.attrs["units"]),
            q_nm=entry["line_out/q_nm"][()],
            index=rows("exposures/index"),
            timestamp=rows("exposures/timestamp"),
            received_time=(
                rows("exposures/received_time")
                if "exposures/received_time" in entry
                else np.full(order.size, np.nan)
            ),
            status=np.array([s.decode(errors="replace") for s in rows("exposures/status")]),
            error=np.array([s.decode(errors="replace") for s in rows("exposures/error")]),
            source=np.array([s.decode(errors="replace") for s in rows("exposures/source")]),
            truth=rows("exposures/truth"),
            counts=rows("line_out/counts"),
            normalization=rows("line_out/normalization"),
            samples=samples[:n][order],
            mean=rows("posterior/mean"),
            sd=rows("posterior/sd"),
            quantiles=rows("posterior/quantiles"),
            predictive_z=rows("posterior/predictive_z"),
            flagged=rows("posterior/flagged").astype(bool),
            width_mode_weights=fractions[:n][order],
            config_json=entry["config"][()].decode(),
            model_card=json.loads(entry["model_card"][()].decode()),
            instrument=stored_instrument(entry),
        )
