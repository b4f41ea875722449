"""Reading 1D curves from any NXcanSAS file (ours, or one reduced elsewhere).

Every ``SASdata`` group of every ``SASentry`` gives its curves: ``Q`` converted to 1/nm,
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

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

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
