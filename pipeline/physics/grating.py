"""The "peaks" line-grating forward model of DESIGN.md section 4.

A line grating of pitch p, line width w = d p (duty cycle d) and edge roughness sigma
scatters into orders n >= 1 at q_n = 2 pi n / p. Each order carries the squared form factor
of one line, (p / (pi n))^2 sin^2(pi n d), damped by a Debye-Waller factor
exp(-q_n^2 sigma^2) and broadened by the instrument resolution (Gaussian, sd ``resolution_nm``).
The observable is a line-out of photon counts on a fixed q grid:
``mu_i = n_photons * I(q_i) / sum_j I(q_j) + background * g_i`` and ``k_i ~ Poisson(mu_i)``,
where ``g`` is the instrument's relative background per bin (1 everywhere unless given; see
:mod:`pipeline.instrument`) and the sum runs over every bin of the grid.

The intensity is identical for w and p - w (the phase problem), so every posterior over
``width_nm`` has two modes of equal weight.

Example:
    >>> import numpy as np
    >>> grid = QGrid()
    >>> theta = np.array([[200.0, 60.0, 5.0, 1e4, 1.0]])
    >>> mu = expected_counts(theta, grid)
    >>> mu.shape, round(float(mu.sum()))
    ((1, 512), 10512)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Parameter order of every parameter array in the project: (..., 5).
PARAMETER_NAMES: tuple[str, ...] = ("pitch_nm", "width_nm", "sigma_nm", "n_photons", "background")
#: The grating's own parameters (the first three; the others are nuisances of the exposure).
GRATING_PARAMETERS: tuple[str, ...] = PARAMETER_NAMES[:3]
#: Units of :data:`PARAMETER_NAMES`, in the same order.
PARAMETER_UNITS: tuple[str, ...] = ("nm", "nm", "nm", "photons", "counts per bin")
#: Half-width, in resolution standard deviations, of the window each peak is evaluated on.
PEAK_HALF_WIDTH_SD = 9.0


@dataclass(frozen=True)
class QGrid:
    """The line-out's q grid: ``n_points`` bin centres from ``q_min_nm`` to ``q_max_nm`` (1/nm).

    ``resolution_nm`` is the Gaussian standard deviation (1/nm) of the instrument resolution.
    """

    q_min_nm: float = 0.01
    q_max_nm: float = 0.40
    n_points: int = 512
    resolution_nm: float = 1.5e-3

    @property
    def q_nm(self) -> np.ndarray:
        """Bin centres in 1/nm, shape (n_points,)."""
        return np.linspace(self.q_min_nm, self.q_max_nm, self.n_points)

    @property
    def bin_width_nm(self) -> float:
        """Distance between neighbouring bin centres in 1/nm."""
        return (self.q_max_nm - self.q_min_nm) / (self.n_points - 1)

    @property
    def radial_range_nm(self) -> tuple[float, float]:
        """Outer bin edges in 1/nm, as pyFAI's ``radial_range``."""
        half = 0.5 * self.bin_width_nm
        return (self.q_min_nm - half, self.q_max_nm + half)


@dataclass(frozen=True)
class GratingPrior:
    """Uniform prior over the grating and log-uniform/uniform priors over the nuisances.

    ``width_nm`` is ``duty * pitch_nm`` with the duty cycle uniform in ``duty``. Setting
    ``fixed_n_photons`` or ``fixed_background`` pins that nuisance (useful in tests).

    Example:
        >>> theta = GratingPrior().sample(4, np.random.default_rng(0))
        >>> theta.shape
        (4, 5)
    """

    pitch_nm: tuple[float, float] = (100.0, 300.0)
    duty: tuple[float, float] = (0.1, 0.9)
    sigma_nm: tuple[float, float] = (1.0, 20.0)
    log10_n_photons: tuple[float, float] = (3.0, 6.0)
    background: tuple[float, float] = (0.0, 5.0)
    fixed_n_photons: float | None = None
    fixed_background: float | None = None

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``n`` parameter vectors, shape (n, 5), in :data:`PARAMETER_NAMES` order."""
        pitch = rng.uniform(*self.pitch_nm, n)
        duty = rng.uniform(*self.duty, n)
        sigma = rng.uniform(*self.sigma_nm, n)
        n_photons = (
            np.full(n, self.fixed_n_photons)
            if self.fixed_n_photons is not None
            else 10.0 ** rng.uniform(*self.log10_n_photons, n)
        )
        background = (
            np.full(n, self.fixed_background)
            if self.fixed_background is not None
            else rng.uniform(*self.background, n)
        )
        return np.stack([pitch, duty * pitch, sigma, n_photons, background], axis=-1)


def _namespace(x: Any) -> Any:
    """numpy for numpy arrays, torch for torch tensors (imported only when used)."""
    if type(x).__module__.startswith("torch"):
        import torch

        return torch
    return np


def expected_counts(
    theta: Any,
    grid: QGrid = QGrid(),
    background_weights: np.ndarray | None = None,
    max_pitch_nm: float | None = None,
) -> Any:
    """Expected counts per q bin for parameter vectors ``theta`` (..., 5) -> (..., n_points).

    ``background_weights`` (n_points,), the instrument's ``g``, scales the background of each
    bin (``None``: 1 in every bin); bins an instrument does not observe get their value all
    the same, and are left out by whatever uses them. ``max_pitch_nm``: a pitch that no row
    of ``theta`` exceeds, which fixes the number of orders summed ahead (``None``: read from
    ``theta``, a number a compiled caller would compile again for each new value); orders
    beyond the grid's end weigh 0, so the counts are the same either way.

    Works on numpy arrays and on torch tensors (same dtype and device as ``theta``, and
    differentiable), with one implementation so that both agree by construction. Each order's
    Gaussian peak is evaluated on the bins within :data:`PEAK_HALF_WIDTH_SD` standard deviations
    of its centre (beyond that it is below 1e-16 of its height), which makes a batch about ten
    times cheaper than evaluating every order on every bin.
    """
    xp = _namespace(theta)
    batch_shape = theta.shape[:-1]
    theta = theta.reshape(-1, theta.shape[-1])
    pitch, width, sigma = theta[:, 0:1], theta[:, 1:2], theta[:, 2:3]
    n_photons, background = theta[:, 3:4], theta[:, 4:5]

    q_cut = grid.q_max_nm + 6.0 * grid.resolution_nm
    largest_pitch = float(pitch.max()) if max_pitch_nm is None else max_pitch_nm
    n_max = max(1, math.floor(q_cut * largest_pitch / (2.0 * math.pi)))
    half = math.ceil(PEAK_HALF_WIDTH_SD * grid.resolution_nm / grid.bin_width_nm)
    if xp is np:
        orders = np.arange(1, n_max + 1, dtype=theta.dtype)
        offsets = np.arange(-half, half + 1)
    else:
        orders = xp.arange(1, n_max + 1, dtype=theta.dtype, device=theta.device)
        offsets = xp.arange(-half, half + 1, device=theta.device)

    q_n = 2.0 * math.pi * orders / pitch  # (rows, orders)
    amplitude = (pitch / (math.pi * orders)) ** 2 * xp.sin(math.pi * orders * width / pitch) ** 2
    weight = amplitude * xp.exp(-((q_n * sigma) ** 2)) * (q_n <= q_cut)
    nearest = xp.floor((q_n - grid.q_min_nm) / grid.bin_width_nm + 0.5)
    bins = nearest[..., None] + offsets  # (rows, orders, window), float
    on_grid = (bins >= 0) & (bins < grid.n_points)
    q_bins = grid.q_min_nm + bins * grid.bin_width_nm
    peaks = weight[..., None] * xp.exp(
        -((q_bins - q_n[..., None]) ** 2) / (2.0 * grid.resolution_nm**2)
    )
    peaks = peaks * on_grid

    rows = theta.shape[0]
    flat_bins = bins.clip(0, grid.n_points - 1) + grid.n_points * (
        np.arange(rows)[:, None, None]
        if xp is np
        else xp.arange(rows, device=theta.device)[:, None, None]
    )
    if xp is np:
        intensity = np.bincount(
            flat_bins.astype(np.int64).ravel(),
            weights=peaks.ravel(),
            minlength=rows * grid.n_points,
        ).astype(theta.dtype, copy=False)
    else:
        intensity = xp.zeros(rows * grid.n_points, dtype=theta.dtype, device=theta.device)
        intensity = intensity.index_add(0, flat_bins.long().reshape(-1), peaks.reshape(-1))
    intensity = intensity.reshape(rows, grid.n_points)
    if background_weights is not None:
        if xp is np:
            background = background * np.asarray(background_weights, dtype=theta.dtype)
        else:
            background = background * xp.as_tensor(
                background_weights, dtype=theta.dtype, device=theta.device
            )
    mu = n_photons * intensity / intensity.sum(-1, keepdims=True) + background
    return mu.reshape(*batch_shape, grid.n_points)


def simulate(
    n: int,
    rng: np.random.Generator,
    prior: GratingPrior = GratingPrior(),
    grid: QGrid = QGrid(),
    background_weights: np.ndarray | None = None,
    observed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` (parameters, counts) pairs from the prior and the Poisson likelihood.

    Returns ``theta`` (n, 5) and ``counts`` (n, n_points) as float64 arrays; bins that
    ``observed`` (n_points,) marks False hold NaN. ``background_weights`` as for
    :func:`expected_counts`.

    Example:
        >>> theta, counts = simulate(8, np.random.default_rng(1))
        >>> counts.shape
        (8, 512)
    """
    theta = prior.sample(n, rng)
    counts = rng.poisson(expected_counts(theta, grid, background_weights)).astype(np.float64)
    if observed is not None:
        counts[:, ~np.asarray(observed, bool)] = np.nan
    return theta, counts
