"""Writing a results file: :class:`ResultsWriter`, the only writer of a scan's file.

The writer makes the file (beside its place, moved there once in SWMR mode), its entry with
the scan's description, and the per-exposure datasets of
:data:`~pipeline.store.schema.ROW_DATASETS`; it appends blocks of exposures as rows, each
block flushed once, and finishes the file with its NXcanSAS groups and its completion
(:meth:`ResultsWriter.close`). The layout: :mod:`pipeline.store.results`.

Example:
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from pipeline.store.rows import ExposureResult
    >>> path = Path(tempfile.mkdtemp()) / "scan.h5"
    >>> with ResultsWriter(path, ("pitch_nm",), ("nm",), 4, np.ones(512), scan_id="s") as w:
    ...     w.append(ExposureResult(index=0, timestamp=0.0)), w.append(ExposureResult(0, 1.0))
    ...     w.close(n_exposures=1)
    (True, False)
    >>> making(path).exists(), path.exists()
    (False, True)
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

import h5py
import hdf5plugin  # registers the bitshuffle filter: samples of files that chose it
import numpy as np

from pipeline.instrument import Instrument
from pipeline.provenance import ProcessingRecord
from pipeline.store.integrity import open_for_reading
from pipeline.store.nxcansas import add_sasdata_groups
from pipeline.store.reader import check_resumable, complete_rows, stored_dataset
from pipeline.store.rows import (
    ExposureResult,
    derived_columns,
    number_column,
    result_columns,
    text_column,
)
from pipeline.store.schema import INSTRUMENT_PATH, ROW_COLUMNS, ROW_DATASETS, RowDataset

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
#: Bytes (before compression) per HDF5 chunk of the per-exposure arrays: 3 exposures' draws
#: of 1,000 samples, 32 line-outs, up to 1,024 summaries per chunk instead of one.
CHUNK_BYTES = 64 * 1024


def _fixed_text(value: str) -> np.ndarray:
    """A fixed-length UTF-8 string scalar (no global heap, so SWMR readers can read it)."""
    data = value.encode()
    return np.array(data, dtype=f"S{max(1, len(data))}")


def making(path: Path) -> Path:
    """Where a new results file for ``path`` is made, until it is ready for readers."""
    return Path(path).with_name(Path(path).name + ".creating")


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
    grid) is continued instead: its complete rows (:func:`~pipeline.store.reader.written_indices`; a row the killed
    writer had only begun is dropped) are copied into a new file beside it, which then
    replaces it, and appending goes on there. The copy is needed because a file whose SWMR
    writer was killed cannot be opened for writing again (HDF5 keeps its "open for write"
    flag; only readers in SWMR mode may open it).

    ``chunk_bytes`` sizes the HDF5 chunks of the per-exposure arrays (0: one exposure per
    chunk; scalars are chunked 1,024 exposures per chunk).

    ``instrument``, the model's (its grid of as many bins as ``q_nm``), is stored in the file
    (:data:`~pipeline.store.schema.INSTRUMENT_PATH`); its masked bins are True in ``line_out/I_mask`` and NaN in
    every row's counts, counts_sd, I and Idev, whatever was sent for them (an integrator gives
    0 counts where no pixel falls). Without it no bin is masked.

    ``sasdata_groups``: the NXcanSAS ``SASdata`` groups :meth:`close` adds, ``"every"``
    exposure's or only the ``"first"`` one's (:func:`~pipeline.store.nxcansas.add_sasdata_groups`).

    ``n_samples`` is the number of posterior draws the file stores per exposure
    (:meth:`~pipeline.config.StoreConfig.draws_stored`; 0 for the summaries alone): rows with
    more keep their first ``n_samples``.
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
        sasdata_groups: Literal["every", "first"] = "every",
    ) -> None:
        self.path = Path(path)
        if sasdata_groups not in ("every", "first"):
            raise ValueError(f"sasdata_groups is every or first, not {sasdata_groups!r}")
        self.sasdata_groups = sasdata_groups
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

        # exposures, line_out and posterior have no NeXus class: in an NXcanSAS entry an
        # NXdata group must be a full SASdata, and an NXcollection a SASnote, which the
        # validator (pynxtools) cannot accept; groups without a class are not validated.
        for group in dict.fromkeys(dataset.group for dataset in ROW_DATASETS):
            entry.create_group(group)
        line_out = entry["line_out"]
        line_out.attrs["default"] = "plot"
        sizes = {"q": n_q, "parameters": n_par, "samples": n_samples}
        self._datasets = {
            dataset.name: _growing(
                entry,
                dataset,
                dataset.shape(sizes),
                chunk_bytes,
                SAMPLES_FILTERS[samples_compression] if dataset.compressible else {},
            )
            for dataset in ROW_DATASETS
        }
        #: (row shape, dtype, fill value) of each dataset, read once (h5py reads them anew)
        self._layout = {
            name: (dataset.shape[1:], dataset.dtype, dataset.fillvalue)
            for name, dataset in self._datasets.items()
        }
        for dataset in ROW_DATASETS:
            attributes = dataset.attributes_for(tuple(parameter_names), tuple(parameter_units))
            self._datasets[dataset.name].attrs.update(attributes)
        q = line_out.create_dataset("q_nm", data=np.asarray(q_nm, dtype=np.float64))
        q.attrs["units"] = "1/nm"
        # the SASdata groups' mask (True: masked): the instrument's masked bins
        line_out.create_dataset("I_mask", data=self.masked)
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
            n = complete_rows(entry)
            index = entry["exposures/index"][:n]
            keep = np.flatnonzero(~np.isin(index, list(drop)))
            for name, dataset in self._datasets.items():
                dataset.resize(keep.size, axis=0)
                source = stored_dataset(entry, name)
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
        """``columns`` (one value per exposure in each; names from
        :data:`~pipeline.store.schema.ROW_COLUMNS`) as
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
            if name == "samples" and value is not None:
                value = _first_draws(value, shape[0])
            if value is None:
                rows[name] = np.full((n, *shape), fill, dtype=dtype)
            elif dtype.kind == "S":
                rows[name] = text_column(name, value, n, dtype)
            else:
                rows[name] = number_column(name, value, n, shape, dtype, fill)
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
        rows |= derived_columns(rows, time.time(), self.masked)
        key_dtype = self._layout["processing_key"][1]
        rows["processing_key"] = np.full(n, self.processing_key.encode(), dtype=key_dtype)
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
        group per exposure with a line-out, or only the first exposure's
        (:attr:`sasdata_groups`; :func:`pipeline.store.nxcansas.add_sasdata_groups`)
        and, given the scan's ``n_exposures`` when it ended, mark the scan complete
        (:func:`~pipeline.store.reader.read_completion`; ``ValueError``, after the groups are written and the file
        closed, when the file holds another number of rows). Nothing reopens the file, so
        readers (SWMR) may hold it open throughout; :class:`ResultsWriteError` when it
        cannot be written (a full disk: the file is left as the last flush left it)."""
        if not self.file.id.valid:
            return
        entry = self.file["entry"]
        try:
            add_sasdata_groups(entry, self.n_rows, first_only=self.sasdata_groups == "first")
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


def _first_draws(samples: Any, n: int) -> Any:
    """The first ``n`` draws of each row of ``samples``: an array (rows, draws, parameters),
    or a list of rows (draws, parameters) or ``None``."""
    if isinstance(samples, np.ndarray):
        return samples[:, :n] if samples.ndim == 3 else samples
    return [None if row is None else np.asarray(row)[:n] for row in samples]


def _chunk_rows(shape: tuple, dtype, chunk_bytes: int) -> int:
    """Rows per HDF5 chunk of a growing dataset: 1,024 for a scalar (or an empty row) per
    exposure, else as many rows as fit in ``chunk_bytes`` (at least 1, at most 1,024). Small
    per-exposure arrays in chunks of one row cost HDF5 about as much per exposure as the
    data itself (``python -m benchmarks.writer``)."""
    row_bytes = np.dtype(dtype).itemsize * int(np.prod(shape))
    if not shape or not row_bytes:
        return 1024
    return max(1, min(1024, chunk_bytes // row_bytes))


def _growing(
    entry: h5py.Group,
    dataset: RowDataset,
    shape: tuple[int, ...],
    chunk_bytes: int,
    filters: Mapping[str, Any],
) -> h5py.Dataset:
    """A new per-exposure dataset of rows of ``shape``, with no rows yet (an axis of length
    0, e.g. no stored draws, is declared growing: HDF5 refuses a chunk of 0)."""
    return entry.create_dataset(
        dataset.path,
        shape=(0, *shape),
        maxshape=(None, *(n if n else None for n in shape)),
        dtype=dataset.dtype,
        chunks=(_chunk_rows(shape, dataset.dtype, chunk_bytes), *(max(n, 1) for n in shape)),
        fillvalue=dataset.fill,
        **filters,
    )
