"""A simulated SAXS detector: grating line-outs spread over a narrow azimuthal band of a 2D frame.

A grating scatters along one direction, so the simulated signal lies in the integration
sector only. The expected counts of each q bin are spread evenly over the pixels of that bin,
and each pixel gets Poisson noise; the sum over a bin's pixels is then Poisson with the bin's
expectation, which is exactly the observable the model was trained on. Pixels within 2% of a
bin edge (or 0.02 degree of a sector edge) get no signal, so that rounding in pyFAI's own
pixel assignment cannot move counts between bins.

Example:
    >>> from pipeline.config import IntegrationConfig
    >>> detector = SimulatedDetector(IntegrationConfig(), seed=0)
    >>> exposure = next(iter(detector.exposures("scan-1", 1)))
    >>> exposure.frame.shape, sorted(exposure.truth)[:2]
    ((2167, 2070), ['background', 'n_photons'])
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from pipeline.config import IntegrationConfig
from pipeline.exposure import Exposure
from pipeline.integration import load_geometry, sector_pixel_bins
from pipeline.physics import PARAMETER_NAMES, GratingPrior, QGrid, expected_counts


class SimulatedDetector:
    """Frames of the bundled (or any) geometry with known ground truth.

    Args:
        integration: the geometry and sector the frames are made for.
        grid: the line-out q grid.
        prior: where the true parameters are drawn from.
        seed: seeds both the parameters and the noise; equal seeds give equal scans.
    """

    EDGE_MARGIN = 0.02

    def __init__(
        self,
        integration: IntegrationConfig,
        grid: QGrid = QGrid(),
        prior: GratingPrior = GratingPrior(),
        seed: int = 0,
    ) -> None:
        geometry = load_geometry(integration.poni)
        self.shape: tuple[int, int] = tuple(geometry.detector.shape)
        self.grid = grid
        self.prior = prior
        self.rng = np.random.default_rng(seed)
        bins = sector_pixel_bins(geometry, grid, integration, margin=self.EDGE_MARGIN).ravel()
        self._pixels = np.flatnonzero(bins >= 0)
        self._pixel_bins = bins[self._pixels]
        pixels_per_bin = np.bincount(self._pixel_bins, minlength=grid.n_points)
        if pixels_per_bin.min() == 0:
            empty = np.flatnonzero(pixels_per_bin == 0)
            raise ValueError(
                f"{empty.size} q bins have no pixel in the sector (first at q = "
                f"{grid.q_nm[empty[0]]:.4f} 1/nm): choose a wider sector or another geometry"
            )
        self._share = 1.0 / pixels_per_bin[self._pixel_bins]

    def frame(self, theta: np.ndarray, noise: bool = True) -> np.ndarray:
        """One frame for parameters ``theta`` (5,): Poisson counts (uint32), or the
        expected counts (float64) when ``noise`` is False."""
        mu = expected_counts(np.asarray(theta, dtype=np.float64)[None], self.grid)[0]
        mu_pixels = mu[self._pixel_bins] * self._share
        if not noise:
            frame = np.zeros(self.shape, np.float64)
            frame.flat[self._pixels] = mu_pixels
            return frame
        frame = np.zeros(self.shape, np.uint32)
        frame.flat[self._pixels] = self.rng.poisson(mu_pixels)
        return frame

    def exposures(self, scan_id: str, n_frames: int) -> Iterator[Exposure]:
        """``n_frames`` exposures with parameters drawn from the prior."""
        for index in range(n_frames):
            theta = self.prior.sample(1, self.rng)[0]
            yield Exposure(
                scan_id=scan_id,
                index=index,
                timestamp=time.time(),
                frame=self.frame(theta),
                truth=dict(zip(PARAMETER_NAMES, map(float, theta), strict=True)),
                metadata={"source": "simulated", "detector": "Eiger4M"},
            )
