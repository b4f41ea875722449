"""NXcanSAS: reading 1D curves from any file (ours, or one reduced elsewhere), and writing the
per-exposure ``SASdata`` groups of ours (:func:`add_sasdata_groups`).

Every ``SASdata`` group of every ``SASentry`` gives its curves (:func:`read_nxcansas`): ``Q`` converted to 1/nm,
``I`` and, where present, its uncertainties (``uncertainties`` attribute, usually ``Idev``),
one curve per frame when ``I`` has more dimensions than ``Q``.

Example:
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from pipeline.store import ExposureResult, ResultsWriter
    >>> path = Path(tempfile.mkdtemp()) / "scan.h5"
    >>> counts = np.full(512, 100.0)
    >>> with ResultsWriter(path, ("pitch_nm",), ("nm",), 4, np.linspace(0.01, 0.4, 512)) as w:
    ...     w.append(ExposureResult(0, 0.0, counts=counts, counts_sd=counts**0.5, normalization=4.0))
    True
    >>> [(c.name, float(c.intensity[0]), float(c.q_nm[-1])) for c in read_nxcansas(path)]
    [('entry/sasdata_000000', 25.0, 0.4)]

References:
    NXcanSAS, https://manual.nexusformat.org/classes/applications/NXcanSAS.html
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.store.schema import DATASETS_BY_NAME

#: Q units NXcanSAS files use, as factors to 1/nm.
Q_UNITS_PER_NM = {"1/nm": 1.0, "1/A": 10.0, "1/angstrom": 10.0, "1/m": 1e-9}


@dataclass(frozen=True)
class SasCurve:
    """One 1D curve: where it came from (group path, with ``[frame]`` for multi-frame data),
    ``q_nm`` (1/nm), ``intensity`` and ``intensity_sd`` (NaN where the file has none) in
    ``intensity_units``."""

    name: str
    q_nm: np.ndarray
    intensity: np.ndarray
    intensity_sd: np.ndarray
    intensity_units: str


def _text(value: object, default: str = "") -> str:
    if value is None:
        return default
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):  # an array attribute: its first entry
        return _text(value.flat[0], default) if value.size else default
    return str(value)


def _curves(group: h5py.Group) -> list[SasCurve]:
    signal = _text(group.attrs.get("signal"), "I")
    axes = _text(group.attrs.get("I_axes"), "Q").split(",")
    q_index = int(np.asarray(group.attrs.get("Q_indices", len(axes) - 1)).flat[0])
    q_name = axes[q_index].strip()
    if signal not in group or q_name not in group:
        raise ValueError(f"{group.name}: no {signal!r} or {q_name!r} dataset")
    q = group[q_name]
    units = _text(q.attrs.get("units"), "1/nm")
    if units not in Q_UNITS_PER_NM:
        raise ValueError(f"{group.name}/{q_name}: Q in unknown units {units!r}")
    q_nm = q[()].astype(np.float64) * Q_UNITS_PER_NM[units]
    intensity = group[signal][()].astype(np.float64)
    uncertainties = _text(group[signal].attrs.get("uncertainties"))
    if uncertainties and uncertainties in group:
        sd = group[uncertainties][()].astype(np.float64)
    else:
        sd = np.full_like(intensity, np.nan)
    intensity_units = _text(group[signal].attrs.get("units"))
    name = group.name.lstrip("/")
    if intensity.ndim == 1:
        return [SasCurve(name, q_nm, intensity, sd, intensity_units)]
    frames = intensity.reshape(-1, intensity.shape[-1])
    sds = sd.reshape(-1, intensity.shape[-1])
    return [
        SasCurve(f"{name}[{k}]", q_nm, frame, frame_sd, intensity_units)
        for k, (frame, frame_sd) in enumerate(zip(frames, sds, strict=True))
    ]


def read_nxcansas(path: Path) -> list[SasCurve]:
    """Every curve of the ``SASdata`` groups in the ``SASentry`` groups of ``path``;
    ``ValueError`` if the file has none."""
    curves: list[SasCurve] = []
    with h5py.File(path, "r") as handle:
        for entry in handle.values():
            if not isinstance(entry, h5py.Group) or _text(entry.attrs.get("canSAS_class")) != (
                "SASentry"
            ):
                continue
            for name in sorted(entry):
                group = entry.get(name)
                if isinstance(group, h5py.Group) and _text(group.attrs.get("canSAS_class")) == (
                    "SASdata"
                ):
                    curves.extend(_curves(group))
    if not curves:
        raise ValueError(f"{path}: no NXcanSAS SASentry with SASdata")
    return curves


#: Attributes of each exposure's ``SASdata`` group (NXcanSAS; ``axes`` for NeXus readers such
#: as silx, which find the Q axis there).
SASDATA_ATTRIBUTES = {
    "NX_class": "NXdata",
    "canSAS_class": "SASdata",
    "signal": "I",
    "I_axes": "Q",
    "axes": "Q",
    "mask": "I_mask",
}
#: Rows of ``line_out`` read at once while the groups are written.
_BLOCK_ROWS = 1024
#: Seconds :func:`add_sasdata_groups` takes per group on this project's build machine
#: (``benchmarks.writer``: ``finish_ms_per_exposure``, 0.30-0.34 ms).
SASDATA_GROUP_S = 3.3e-4


def add_sasdata_groups(entry: h5py.Group, n_rows: int, first_only: bool = False) -> None:
    """Add to a results file's ``entry`` (open for writing: the writer's own handle, in SWMR
    mode or not; a new or resumed file, which holds none yet) one NXcanSAS ``SASdata`` group
    per exposure among its first ``n_rows`` rows that has a line-out (with ``first_only``,
    only for the first of them: the file stays NXcanSAS, and finishing a scan of a million
    exposures takes no time), and make the first (lowest index) the entry's ``default``: a
    SASentry's default plot is one of its SASdata.

    ``sasdata_NNNNNN`` (NNNNNN: the exposure index) holds ``I`` and ``Idev``, plain copies of
    the exposure's row of ``line_out/I`` and ``line_out/Idev`` (every reader opens them;
    one-row virtual datasets tripped nexusformat), ``I_errors`` (a link to ``Idev``: silx
    reads a signal's errors from there, not from ``@uncertainties``), and links to
    ``line_out/q_nm`` (``Q``), ``line_out/I_mask`` and ``line_out/Qdev`` where the file has
    it: ``I_mask`` is True at the instrument's masked bins, where ``I`` and ``Idev`` are NaN
    (SasView's reader leaves NaN points out). SasView's reader (``sasdata`` 0.11) returns
    every frame of a multi-frame ``SASdata`` group as the last one, hence a group per
    exposure. Each group is a copy of one made in memory (:func:`_sasdata_template`: its
    attributes, ``I``, ``Idev`` and ``I_errors``; HDF5's ``H5Ocopy``), then given its curve
    and links with h5py's low-level calls: 0.2 ms per group on this project's build machine,
    against 0.47 ms when each attribute and dataset is made anew (and 3x that with h5py's
    high-level calls); with reading the rows and flushing, :data:`SASDATA_GROUP_S` per
    exposure.
    """
    line_out = entry["line_out"]
    index = entry[DATASETS_BY_NAME["index"].path][:n_rows]
    status = entry[DATASETS_BY_NAME["status"].path][:n_rows]
    ok = np.flatnonzero((index >= 0) & (status == b"ok"))
    rows = ok[np.argsort(index[ok], kind="stable")]
    if first_only:
        rows = rows[:1]
    links = {
        link.encode(): target.encode() for link, target in _LINKS.items() if target in line_out
    }
    with _sasdata_template(line_out["q_nm"].shape[0]) as template:
        for start in range(0, len(rows), _BLOCK_ROWS):
            block = rows[start : start + _BLOCK_ROWS]
            first, end = int(block.min()), int(block.max()) + 1
            curves = {
                field.encode(): entry[DATASETS_BY_NAME[field].path][first:end]
                for field in ("I", "Idev")
            }
            for row in block:
                name = f"sasdata_{index[row]:06d}".encode()
                h5py.h5o.copy(template.id, _TEMPLATE, entry.id, name)
                group = h5py.h5g.open(entry.id, name)
                for field, values in curves.items():
                    dataset = h5py.h5d.open(group, field)
                    curve = np.ascontiguousarray(values[row - first])
                    dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, curve)
                for link, target in links.items():
                    group.links.create_hard(link, line_out.id, target)
    if rows.size:
        entry.attrs.modify("default", f"sasdata_{index[rows[0]]:06d}")


#: The name of the template group in :func:`_sasdata_template`'s file.
_TEMPLATE = b"sasdata"
#: Each ``SASdata`` group's links into ``line_out`` (where the file has the target).
_LINKS = {"Q": "q_nm", "I_mask": "I_mask", "Qdev": "Qdev"}


def _sasdata_template(n_q: int) -> h5py.File:
    """An HDF5 file in memory holding the group each exposure's ``SASdata`` group copies:
    :data:`SASDATA_ATTRIBUTES`, ``Q_indices``, ``I`` and ``Idev`` (float32, ``n_q`` bins,
    with their units and ``I``'s ``uncertainties``, no data written) and ``I_errors`` (a link
    to ``Idev``); the results file's links (``Q``, ``I_mask``, ``Qdev``) are added to each
    copy."""
    template = h5py.File(
        f"sasdata-template-{uuid.uuid4().hex}",
        "w",
        driver="core",
        backing_store=False,
        libver="latest",
    )
    try:
        group = template.create_group(_TEMPLATE.decode())
        text = _TextAttributes()
        for key, value in SASDATA_ATTRIBUTES.items():
            text.write(group.id, key, value)
        scalar = h5py.h5s.create(h5py.h5s.SCALAR)
        q_indices = h5py.h5a.create(group.id, b"Q_indices", h5py.h5t.STD_I64LE, scalar)
        q_indices.write(np.array(0, dtype=np.int64))
        curve = h5py.h5s.create_simple((n_q,))
        for field in ("I", "Idev"):
            dataset = h5py.h5d.create(group.id, field.encode(), h5py.h5t.IEEE_F32LE, curve)
            for key, attribute in DATASETS_BY_NAME[field].attributes_for((), ()).items():
                text.write(dataset, key, str(attribute))  # units, and uncertainties of I
        group["I_errors"] = group["Idev"]
    except BaseException:
        template.close()
        raise
    return template


class _TextAttributes:
    """Writes scalar text attributes as h5py's ``attrs`` does (variable-length UTF-8), with
    one type and dataspace for all."""

    def __init__(self) -> None:
        self.dtype = h5py.string_dtype()
        self.type = h5py.h5t.py_create(self.dtype, logical=True)
        self.space = h5py.h5s.create(h5py.h5s.SCALAR)

    def write(self, owner: h5py.h5o.ObjectID, name: str, value: str) -> None:
        attribute = h5py.h5a.create(owner, name.encode(), self.type, self.space)
        attribute.write(np.array(value, dtype=self.dtype))
