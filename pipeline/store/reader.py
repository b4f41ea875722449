"""Reading results files: their rows, the scan they describe and whether it finished.

Every reader opens a file with :func:`~pipeline.store.integrity.open_for_reading` (in SWMR
mode: also a file being written, or left by a killed writer) and counts only the rows that
are complete in every per-exposure dataset of :data:`~pipeline.store.schema.ROW_DATASETS`
(:func:`complete_rows`; a killed writer may have grown some datasets and not others, or
grown rows it had not yet written, whose index is -1). Datasets that files of earlier
versions lack read as rows of their fill value.

Example:
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from pipeline.store import ExposureResult, ResultsWriter
    >>> path = Path(tempfile.mkdtemp()) / "scan.h5"
    >>> with ResultsWriter(path, ("pitch_nm",), ("nm",), 4, np.ones(512)) as writer:
    ...     writer.append(ExposureResult(index=7, timestamp=0.0, status="failed"))
    True
    >>> written_indices(path), open_results(path).status.tolist(), read_completion(path)
    ({7}, ['failed'], None)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 (registers the bitshuffle filter: samples of files that chose it)
import numpy as np

from pipeline.instrument import Instrument
from pipeline.provenance import ProcessingRecord
from pipeline.store.integrity import DamagedResultsError, open_for_reading
from pipeline.store.schema import (
    DATASETS_BY_NAME,
    INSTRUMENT_PATH,
    ROW_DATASETS,
    RowDataset,
    row_paths,
)

INDEX, STATUS, SAMPLES = (DATASETS_BY_NAME[name].path for name in ("index", "status", "samples"))


def stored_dataset(entry: h5py.Group, name: str) -> h5py.Dataset | None:
    """The per-exposure dataset of column ``name`` in a results file's ``entry``
    (:func:`~pipeline.store.schema.row_paths`); ``None`` in a file of an earlier version
    that has none."""
    for path in row_paths(name):
        if path in entry:
            return entry[path]
    return None


def complete_rows(entry: h5py.Group) -> int:
    """Rows written to every per-exposure dataset (a killed writer may have grown some);
    ``ValueError`` when one is missing that every file of this format has."""
    datasets = {dataset: stored_dataset(entry, dataset.name) for dataset in ROW_DATASETS}
    missing = [dataset for dataset, stored in datasets.items() if stored is None]
    if any(not dataset.added_later for dataset in missing):
        paths = ", ".join(dataset.path for dataset in missing)
        raise ValueError(f"not a results file of this version: no {paths}")
    return min(stored.shape[0] for stored in datasets.values() if stored is not None)


def _stored_rows(entry: h5py.Group, dataset: RowDataset, n: int) -> np.ndarray:
    """The first ``n`` rows of a scalar per-exposure dataset, its fill value in a file of an
    earlier version that lacks it."""
    stored = stored_dataset(entry, dataset.name)
    if stored is None:
        return np.full(n, dataset.fill, dtype=dataset.dtype)
    return stored[:n]


def _as_read(dataset: RowDataset, rows: np.ndarray) -> np.ndarray:
    """Rows as :class:`Results` gives them: text decoded, 0/1 flags as bool."""
    if rows.dtype.kind == "S":
        return np.array([text.decode(errors="replace") for text in rows])
    return rows.astype(bool) if dataset.boolean else rows


def stored_identities(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The exposure index, whether it failed, and the frame identity (empty where none) of
    each complete row of a results file (also of one whose writer was killed)."""
    with open_for_reading(path) as handle:
        entry = handle["entry"]
        n = complete_rows(entry)
        index = entry[INDEX][:n]
        failed = entry[STATUS][:n] != b"ok"
        frame_ids = _as_read(
            DATASETS_BY_NAME["frame_id"], _stored_rows(entry, DATASETS_BY_NAME["frame_id"], n)
        ).tolist()
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
        return {int(i) for i in entry[INDEX][: complete_rows(entry)]}


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
        complete_rows(entry)
        card = json.loads(entry["model_card"][()].decode())
        differences = {
            "scan id": (str(entry.attrs["scan_id"]), scan_id),
            "model": (card.get("weights_sha256"), (model_card or {}).get("weights_sha256")),
            "samples per exposure": (entry[SAMPLES].shape[1], n_samples),
            "parameters": (
                tuple(entry[SAMPLES].attrs["parameter_names"]),
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
    """What a finished scan's results file says of itself
    (:meth:`ResultsWriter.close <pipeline.store.writer.ResultsWriter.close>`)."""

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
                n_samples=int(entry[SAMPLES].shape[1]),
            )
    except (OSError, KeyError, ValueError):
        return None


def rows_since(
    path: Path, names: tuple[str, ...], start: int = 0, stop: int | None = None, step: int = 1
) -> tuple[int, dict[str, np.ndarray]]:
    """The number of complete rows of a results file (also of one being written: SWMR) and,
    of the per-exposure columns ``names``, its complete rows ``[start:stop:step]`` (as a
    Python slice: a negative ``start`` counts from the last complete row), as
    :class:`Results` gives them (text decoded, flags as bool): what a live view reads again
    and again, taking only the rows added since it last looked, or the newest ones. A column
    that a file of an earlier version lacks reads as its fill value.

    Example:
        >>> import tempfile
        >>> from pipeline.store import ExposureResult, ResultsWriter
        >>> path = Path(tempfile.mkdtemp()) / "scan.h5"
        >>> with ResultsWriter(path, ("pitch_nm",), ("nm",), 4, np.ones(512)) as writer:
        ...     for index in range(3):
        ...         writer.append(ExposureResult(index=index, timestamp=0.0, status="failed"))
        True
        True
        True
        >>> n, rows = rows_since(path, ("index", "status"), start=1)
        >>> n, rows["index"].tolist(), rows["status"].tolist()
        (3, [1, 2], ['failed', 'failed'])
        >>> rows_since(path, ("index",), start=-2)[1]["index"].tolist()
        [1, 2]
    """
    with open_for_reading(path) as handle:
        entry = handle["entry"]
        n = complete_rows(entry)
        begin, end, stride = slice(start, stop, step).indices(n)
        columns = {}
        for name in names:
            dataset = DATASETS_BY_NAME[name]
            stored = stored_dataset(entry, name)
            if stored is None:
                size = len(range(begin, end, stride))
                rows = np.full(size, dataset.fill, dtype=dataset.dtype)
            elif begin >= end:
                rows = np.empty((0, *stored.shape[1:]), dtype=stored.dtype)
            else:
                rows = stored[begin:end:stride]
            columns[name] = _as_read(dataset, rows)
    return n, columns


def latest_posterior(path: Path, look_back: int = 64) -> tuple[int, np.ndarray] | None:
    """The exposure index and posterior samples (samples, parameters) of the newest
    successful row among the last ``look_back`` of a results file, also of one being written
    (SWMR); ``None`` when there is none yet."""
    with open_for_reading(path) as handle:
        entry = handle["entry"]
        n = complete_rows(entry)
        first = max(0, n - look_back)
        status = entry[STATUS][first:n]
        ok = np.flatnonzero(status == b"ok")
        if ok.size == 0:
            return None
        row = first + int(ok[-1])
        return int(entry[INDEX][row]), entry[SAMPLES][row]


@dataclass
class Results:
    """A results file read into memory; rows sorted by exposure index (the per-exposure
    datasets :data:`~pipeline.store.schema.ROW_DATASETS` marks ``read``)."""

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
        n = complete_rows(entry)
        index = entry[INDEX][:n]
        written = np.flatnonzero(index >= 0)
        order = written[np.argsort(index[written], kind="stable")]
        samples = entry[SAMPLES]
        columns = {
            dataset.name: _as_read(dataset, _stored_rows(entry, dataset, n)[order])
            for dataset in ROW_DATASETS
            if dataset.read
        }
        return Results(
            scan_id=str(entry.attrs["scan_id"]),
            parameter_names=tuple(samples.attrs["parameter_names"]),
            parameter_units=tuple(samples.attrs["units"]),
            q_nm=entry["line_out/q_nm"][()],
            config_json=entry["config"][()].decode(),
            model_card=json.loads(entry["model_card"][()].decode()),
            instrument=stored_instrument(entry),
            **columns,
        )
