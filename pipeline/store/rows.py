"""Exposures as blocks of rows: what the results writer is given, and what it adds.

The writer takes a block of exposures as columns (:data:`~pipeline.store.schema.ROW_COLUMNS`:
one value per exposure in each), from :class:`ExposureResult` objects
(:func:`result_columns`) or straight from a worker's message; each column becomes an array
in its dataset's dtype (:func:`text_column`, :func:`number_column`), and the writer adds the
columns it computes itself (:func:`derived_columns`).

Example:
    >>> import numpy as np
    >>> columns = result_columns([ExposureResult(index=3, timestamp=0.0, error="bad frame")])
    >>> columns["index"], columns["error"]
    ([3], ['bad frame'])
    >>> text_column("error", columns["error"], 1, np.dtype("S8"))
    array([b'bad f...'], dtype='|S8')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.physics.quality import Z_THRESHOLD
from pipeline.store.schema import ROW_COLUMNS


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


def result_columns(results: list[ExposureResult]) -> dict[str, list]:
    """The columns of ``results`` (lists, ``None`` where a result has no value), for
    :meth:`ResultsWriter.rows <pipeline.store.writer.ResultsWriter.rows>`."""
    return {name: [getattr(result, name) for result in results] for name in ROW_COLUMNS}


def concatenate_rows(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Blocks of rows (:meth:`ResultsWriter.rows <pipeline.store.writer.ResultsWriter.rows>`)
    as one block, in order."""
    if len(blocks) == 1:
        return blocks[0]
    return {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}


def _cut(value: str, length: int) -> bytes:
    """``value`` as UTF-8 of at most ``length`` bytes: longer text is cut, ending in "..."."""
    data = value.encode()
    return data if len(data) <= length else data[: length - 3] + b"..."


def text_column(name: str, values: Any, n: int, dtype: np.dtype) -> np.ndarray:
    """``n`` texts (``None``: empty) of column ``name`` as fixed-length UTF-8 of ``dtype``
    (an array of that dtype is taken as it is); ``ValueError`` for another number of them."""
    if isinstance(values, np.ndarray) and values.dtype == dtype and values.shape == (n,):
        return values
    if isinstance(values, str | bytes) or len(values) != n:
        raise ValueError(f"column {name!r}: expected {n} texts")
    return np.array([_cut("" if v is None else str(v), dtype.itemsize) for v in values], dtype)


def number_column(
    name: str, values: Any, n: int, shape: tuple, dtype: np.dtype, fill: Any
) -> np.ndarray:
    """``n`` rows of ``shape`` (``None``: a row of ``fill``) of column ``name`` as one array
    of ``dtype``; ``ValueError`` for another number of rows, a row of another shape, or
    values that are not numbers."""
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


def derived_columns(
    rows: dict[str, np.ndarray], now: float, masked: np.ndarray
) -> dict[str, np.ndarray]:
    """``written_time`` (``now``, s since the epoch), ``flagged``, the line-out with NaN in
    the ``masked`` bins, and divided by its normalization (``I``, ``Idev``; by 1 where the
    normalization is missing or not positive)."""
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
