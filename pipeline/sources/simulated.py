"""A simulated SAXS detector: grating line-outs spread over a narrow azimuthal band of a 2D frame.

A grating scatters along one direction, so the simulated signal lies in the integration
sector only. The frames are made for an :class:`~pipeline.instrument.Instrument` (q grid,
background weights, masked bins, prior): the expected counts of each q bin,
``instrument.expected_counts(theta)`` (the grating's share of ``n_photons`` plus
``background * g_i``), are spread evenly over the pixels of that bin, and each pixel gets
Poisson noise; the sum over a bin's pixels is then Poisson with the bin's expectation, which
is exactly the observable the model was trained on. For an instrument derived from its
geometry (``g_i`` proportional to the bin's pixels), the background per pixel is therefore
the same in every bin. Pixels within 2% of a bin edge (or 0.02 degree of a sector edge) get
no counts, so that rounding in pyFAI's own pixel assignment cannot move counts between bins.
Bins with no pixel in the sector (a module gap) are allowed where the instrument masks them.

Example:
    >>> from pipeline.config import IntegrationConfig
    >>> detector = SimulatedDetector(IntegrationConfig(), seed=0)  # the default instrument
    >>> scan = detector.scan("scan-1", n_frames=1)
    >>> [exposure] = scan.exposures()
    >>> exposure.frame.shape, sorted(exposure.truth)[:2], exposure.metadata["detector"]
    ((2167, 2070), ['background', 'n_photons'], 'Eiger4M')
    >>> scan.ended_cleanly, scan.statistics.summary()
    (True, '1 frame (1 read, 0 failed)')
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np

from pipeline.config import IntegrationConfig
from pipeline.exposure import Exposure
from pipeline.instrument import Instrument, default_instrument
from pipeline.integration import load_geometry, sector_pixel_bins
from pipeline.physics import PARAMETER_NAMES
from pipeline.sources.base import FrameCounts


class SimulatedDetector:
    """Frames of a geometry (the bundled one, or any PONI) with known ground truth.

    Args:
        integration: the geometry (PONI), mask and sector the frames are made for.
        instrument: the q grid, background weights, masked bins and prior the frames are
            simulated with (``None``: :func:`~pipeline.instrument.default_instrument`).
        seed: seeds both the parameters and the noise; equal seeds give equal scans.

    ``ValueError`` when a bin the instrument observes has no pixel in the sector.
    """

    EDGE_MARGIN = 0.02

    def __init__(
        self, integration: IntegrationConfig, instrument: Instrument | None = None, seed: int = 0
    ) -> None:
        geometry = load_geometry(integration.poni)
        self.instrument = instrument = instrument or default_instrument()
        self.shape: tuple[int, int] = tuple(geometry.detector.shape)
        #: the geometry's detector (its pyFAI class: ``Eiger4M``, ``Pilatus1M``, ...)
        self.detector = type(geometry.detector).__name__
        self.rng = np.random.default_rng(seed)
        grid = instrument.grid
        bins = sector_pixel_bins(geometry, grid, integration, margin=self.EDGE_MARGIN).ravel()
        self._pixels = np.flatnonzero(bins >= 0)
        self._pixel_bins = bins[self._pixels]
        pixels_per_bin = np.bincount(self._pixel_bins, minlength=grid.n_points)
        empty = np.flatnonzero((pixels_per_bin == 0) & instrument.observed)
        if empty.size:
            raise ValueError(
                f"{empty.size} q bins that the instrument {instrument.name!r} observes have no "
                f"pixel in the sector (first: bin {empty[0]}, q = {grid.q_nm[empty[0]]:.4f} "
                "1/nm): choose a wider sector, another geometry, or an instrument that masks them"
            )
        self._share = 1.0 / pixels_per_bin[self._pixel_bins]

    def frame(self, theta: np.ndarray, noise: bool = True) -> np.ndarray:
        """One frame for parameters ``theta`` (5,): Poisson counts (uint32), or the
        expected counts (float64) when ``noise`` is False."""
        mu = self.instrument.expected_counts(np.asarray(theta, dtype=np.float64)[None])[0]
        mu_pixels = mu[self._pixel_bins] * self._share
        if not noise:
            frame = np.zeros(self.shape, np.float64)
            frame.flat[self._pixels] = mu_pixels
            return frame
        frame = np.zeros(self.shape, np.uint32)
        frame.flat[self._pixels] = self.rng.poisson(mu_pixels)
        return frame

    def scan(self, scan_id: str, n_frames: int) -> SimulatedScan:
        """A scan of ``n_frames`` exposures with parameters drawn from the instrument's prior
        (a :class:`~pipeline.sources.base.Source`)."""
        return SimulatedScan(self, scan_id, n_frames)


class SimulatedScan:
    """``n_frames`` exposures of a :class:`SimulatedDetector`, each with its true parameters
    (a :class:`~pipeline.sources.base.Source`: it ends cleanly once every frame is given)."""

    def __init__(self, detector: SimulatedDetector, scan_id: str, n_frames: int) -> None:
        if n_frames < 0:
            raise ValueError(f"n_frames must not be negative, not {n_frames}")
        self.detector = detector
        self.scan_id = scan_id
        self.n_frames = n_frames
        self.statistics = FrameCounts()
        self.ended_cleanly = False
        self._stop = threading.Event()

    def exposures(self) -> Iterator[Exposure]:
        """The frames, drawn as they are taken."""
        prior = self.detector.instrument.grating_prior
        for index in range(self.n_frames):
            if self._stop.is_set():
                return
            theta = prior.sample(1, self.detector.rng)[0]
            self.statistics.count(error=None)
            yield Exposure(
                scan_id=self.scan_id,
                index=index,
                timestamp=time.time(),
                frame=self.detector.frame(theta),
                truth=dict(zip(PARAMETER_NAMES, map(float, theta), strict=True)),
                metadata={"source": "simulated", "detector": self.detector.detector},
            )
        self.ended_cleanly = True

    def stop(self) -> None:
        """No frame after the one being taken."""
        self._stop.set()
