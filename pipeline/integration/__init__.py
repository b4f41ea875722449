"""Azimuthal integration of detector frames into line-outs with pyFAI.

One :class:`LineOutIntegrator` per process: pyFAI's CSR engine keeps scratch buffers and
gives wrong results when one integrator is shared between threads (DESIGN.md section 7).
The engine is built on the first frame (about a second for an Eiger 4M) and reused.

The line-out is the observable the model was trained on: the *sum* of counts of the pixels
whose centres fall in each q bin of the model's grid, inside an azimuthal sector
(no pixel splitting, no solid-angle or polarization correction), with Poisson errors
``sqrt(max(counts, 1))`` per bin. (pyFAI's own Poisson model floors the variance at 1 per
*pixel*, which overstates the error of a bin of many empty pixels.)

Example:
    >>> import numpy as np
    >>> from pipeline.config import IntegrationConfig
    >>> from pipeline.physics import QGrid
    >>> integrator = LineOutIntegrator(IntegrationConfig(), QGrid())
    >>> line_out = integrator.integrate(np.zeros(integrator.shape, dtype=np.uint32))
    >>> line_out.counts.shape
    (512,)
"""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path

import numpy as np

# pyFAI's OpenCL probe warns on every import where pyopencl is absent; we use its Cython engines.
logging.getLogger("silx.opencl.common").setLevel(logging.ERROR)

import pyFAI  # noqa: E402
from pyFAI.integrator.azimuthal import AzimuthalIntegrator  # noqa: E402

from pipeline.config import IntegrationConfig  # noqa: E402
from pipeline.exposure import LineOut  # noqa: E402
from pipeline.physics import QGrid  # noqa: E402

#: The geometry shipped with the package: Eiger 4M at 5 m, 8 keV.
DEFAULT_PONI = Path(str(files("pipeline") / "data" / "eiger4m_5m_8keV.poni"))


class FrameError(ValueError):
    """A frame that cannot be integrated (wrong shape, NaN or inf, ...)."""


def load_geometry(poni: Path | None) -> AzimuthalIntegrator:
    """An :class:`AzimuthalIntegrator` from a PONI file (the bundled one when ``None``)."""
    path = Path(poni) if poni is not None else DEFAULT_PONI
    if not path.is_file():
        raise FileNotFoundError(f"PONI file not found: {path}")
    integrator = pyFAI.load(str(path))
    if integrator.detector is None or integrator.detector.shape is None:
        raise ValueError(f"PONI file {path} names no detector with a known shape")
    return integrator


def sector_pixel_bins(
    geometry: AzimuthalIntegrator, grid: QGrid, config: IntegrationConfig, margin: float = 0.0
) -> np.ndarray:
    """Index of the q bin each pixel falls in, -1 outside the sector, the grid or the mask.

    ``margin`` (a fraction of a bin, and of a degree in chi) drops pixels that sit that close
    to a bin edge or a sector edge, so that a simulator using these bins agrees exactly
    with pyFAI's own assignment despite rounding.
    """
    q = geometry.center_array(unit="q_nm^-1")
    chi = np.degrees(geometry.center_array(unit="chi_rad"))
    position = (q - grid.radial_range_nm[0]) / grid.bin_width_nm
    bins = np.floor(position).astype(np.int64)
    fraction = position - bins
    dchi = np.abs((chi - config.chi_center_deg + 180.0) % 360.0 - 180.0)
    inside = (
        (bins >= 0)
        & (bins < grid.n_points)
        & (dchi <= config.chi_half_width_deg - margin)
        & (fraction >= margin)
        & (fraction <= 1.0 - margin)
    )
    mask = geometry.detector.mask
    if mask is not None:
        inside &= ~mask.astype(bool)
    return np.where(inside, bins, -1)


class LineOutIntegrator:
    """Integrates frames of one detector geometry onto the model's q grid (one per process)."""

    def __init__(self, config: IntegrationConfig, grid: QGrid) -> None:
        self.config = config
        self.grid = grid
        self.geometry = load_geometry(config.poni)
        self.shape: tuple[int, int] = tuple(self.geometry.detector.shape)
        mask = self.geometry.detector.mask
        self.mask = np.zeros(self.shape, np.int8) if mask is None else mask.astype(np.int8)
        chi0, half = config.chi_center_deg, config.chi_half_width_deg
        self._azimuth_range = (chi0 - half, chi0 + half)

    def validate(self, frame: np.ndarray) -> None:
        """Raise :class:`FrameError` for a frame this geometry cannot integrate."""
        if frame.ndim != 2 or tuple(frame.shape) != self.shape:
            raise FrameError(f"frame shape {frame.shape} does not match the detector {self.shape}")
        if not (np.issubdtype(frame.dtype, np.integer) or np.issubdtype(frame.dtype, np.floating)):
            raise FrameError(f"frame dtype {frame.dtype} is not numeric")
        if np.issubdtype(frame.dtype, np.floating) and not np.isfinite(frame).all():
            bad = int(np.count_nonzero(~np.isfinite(frame)))
            raise FrameError(f"frame holds {bad} NaN or infinite pixel values")

    def integrate(self, frame: np.ndarray) -> LineOut:
        """The line-out of one frame: counts per q bin and their Poisson sd (see the module doc)."""
        self.validate(frame)
        result = self.geometry.integrate1d(
            frame,
            self.grid.n_points,
            unit="q_nm^-1",
            radial_range=self.grid.radial_range_nm,
            azimuth_range=self._azimuth_range,
            mask=self.mask,
            correctSolidAngle=False,
            polarization_factor=None,
            method=("no", self.config.method, "cython"),
        )
        counts = np.asarray(result.sum_signal, dtype=np.float64).reshape(-1)
        return LineOut(
            q_nm=self.grid.q_nm, counts=counts, counts_sd=np.sqrt(np.maximum(counts, 1.0))
        )
