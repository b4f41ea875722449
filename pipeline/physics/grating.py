"""The "peaks" line-grating forward model of DESIGN.md section 4.

A line grating of pitch p, line width w = d p (duty cycle d) and edge roughness sigma
scatters into orders n >= 1 at q_n = 2 pi n / p. Each order carries the squared form factor
of one line, (p / (pi n))^2 sin^2(pi n d), damped by a Debye-Waller factor
exp(-q_n^2 sigma^2) and broadened by the instrument resolution (Gaussian, sd ``resolution_nm``).
The observable is a line-out of photon counts on a fixed q grid:
``mu_i = n_photons * I(q_i) / sum_j I(q_j) + background`` and ``k_i ~ Poisson(mu_i)``.

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
#: Units of :data:`PARAMETER_NAMES`, in the same order.
PARAMETER_UNITS: tuple[str, ...] = ("nm", "nm", "nm", "photons", "counts per bin")


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


def expected_counts(theta: Any, grid: QGrid = QGrid()) -> Any:
    """Expected counts per q bin for parameter vectors ``theta`` (..., 5) -> (..., n_points).

    Works on numpy arrays and on torch tensors (same dtype and device as ``theta``, and
    differentiable), with one implementation so that both agree by construction.
    """
    xp = _namespace(theta)
    pitch, width, sigma = theta[..., 0:1], theta[..., 1:2], theta[..., 2:3]
    n_photons, background = theta[..., 3:4], theta[..., 4:5]
    duty = width / pitch

    q_cut = grid.q_max_nm + 6.0 * grid.resolution_nm
    max_pitch = float(pitch.max())
    n_max = max(1, math.floor(q_cut * max_pitch / (2.0 * math.pi)))
    if xp is np:
        orders = np.arange(1, n_max + 1, dtype=theta.dtype)
        q = np.asarray(grid.q_nm, dtype=theta.dtype)
    else:
        orders = xp.arange(1, n_max + 1, dtype=theta.dtype, device=theta.device)
        q = xp.as_tensor(grid.q_nm, dtype=theta.dtype, device=theta.device)

    q_n = 2.0 * math.pi * orders / pitch  # (..., orders)
    amplitude = (pitch / (math.pi * orders)) ** 2 * xp.sin(math.pi * orders * duty) ** 2
    weight = amplitude * xp.exp(-((q_n * sigma) ** 2)) * (q_n <= q_cut)
    peak_shape = xp.exp(-((q - q_n[..., None]) ** 2) / (2.0 * grid.resolution_nm**2))
    intensity = (weight[..., None] * peak_shape).sum(-2)  # (..., n_points)
    return n_photons * intensity / intensity.sum(-1, keepdims=True) + background


def simulate(
    n: int,
    rng: np.random.Generator,
    prior: GratingPrior = GratingPrior(),
    grid: QGrid = QGrid(),
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` (parameters, counts) pairs from the prior and the Poisson likelihood.

    Returns ``theta`` (n, 5) and ``counts`` (n, n_points) as float64 arrays.

    Example:
        >>> theta, counts = simulate(8, np.random.default_rng(1))
        >>> counts.shape
        (8, 512)
    """
    theta = prior.sample(n, rng)
    counts = rng.poisson(expected_counts(theta, grid)).astype(np.float64)
    return theta, counts
