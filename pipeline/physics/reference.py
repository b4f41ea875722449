"""The exact posterior of the grating model on staged grids: the reference for every estimator.

Given one line-out of counts and known nuisances (``n_photons``, ``background``), the
posterior over (pitch p, duty d = w / p, sigma) under the uniform prior is evaluated with the
exact Poisson likelihood in stages (DESIGN.md section 4):

1. **Pitch scan.** The profile likelihood of p over its whole prior range (step
   ``pitch_step_nm``), maximised over a coarse (d, sigma) grid. Peak positions depend on p
   only, so this finds every pitch that explains the peaks, harmonics included.
2. **Pitch refinement** around each local maximum of the profile within ``threshold`` log
   units of the best one.
3. **Regions in (d, sigma).** At each refined pitch, a (d, sigma) grid over the whole prior;
   the connected regions where the log-likelihood is within ``threshold`` of its maximum are
   the modes. The likelihood is the same for d and 1 - d (the phase problem), so a grating
   with d != 0.5 gives two regions; they are found and integrated separately, not assumed.
4. **Local grids.** A fine 3D grid around each mode, re-fitted once to the cells within
   ``threshold`` of the maximum, gives the mode's probability mass (its weight), moments and
   samples (a cell drawn by mass, then a uniform position inside it).

Cells are about a third of a posterior standard deviation wide on the final grids, so masses
and moments are accurate to well under a percent (the tests check the mirror modes' weights
against 0.5 within 0.02).

Example:
    >>> import numpy as np
    >>> from pipeline.physics import expected_counts
    >>> truth = np.array([200.0, 60.0, 3.0, 1e4, 1.0])
    >>> counts = np.random.default_rng(0).poisson(expected_counts(truth[None])[0])
    >>> posterior = reference_posterior(counts, n_photons=1e4, background=1.0)
    >>> len(posterior.modes), [round(m.weight, 1) for m in posterior.modes]
    (2, [0.5, 0.5])
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from pipeline.physics.grating import GRATING_PARAMETERS, GratingPrior, QGrid, expected_counts

#: Order of the reference posterior's parameters (the grating's).
REFERENCE_PARAMETERS: tuple[str, ...] = GRATING_PARAMETERS


@dataclass
class ReferenceMode:
    """One separated region of the posterior: its weight and moments of (pitch, width, sigma)."""

    weight: float
    mean: np.ndarray
    sd: np.ndarray
    pitch_range_nm: tuple[float, float]
    duty_range: tuple[float, float]
    sigma_range_nm: tuple[float, float]


@dataclass
class ReferencePosterior:
    """The exact posterior of one exposure: samples (n, 3) of (pitch, width, sigma) and modes,
    heaviest first."""

    samples: np.ndarray
    modes: list[ReferenceMode]
    n_evaluations: int
    wall_s: float
    parameter_names: tuple[str, ...] = REFERENCE_PARAMETERS
    notes: list[str] = field(default_factory=list)


class _Likelihood:
    """Poisson log-likelihood of (p, d, sigma) rows for one line-out over its observed bins,
    counting evaluations."""

    def __init__(
        self,
        counts: np.ndarray,
        n_photons: float,
        background: float,
        grid: QGrid,
        background_weights: np.ndarray | None,
        observed: np.ndarray,
    ) -> None:
        self.observed = torch.as_tensor(observed)
        self.counts = torch.as_tensor(np.asarray(counts, dtype=np.float64)[observed])
        self.n_photons, self.background, self.grid = n_photons, background, grid
        self.background_weights = background_weights
        self.n_evaluations = 0

    def __call__(
        self, pitch: np.ndarray, duty: np.ndarray, sigma: np.ndarray, chunk: int = 8192
    ) -> np.ndarray:
        pitch, duty, sigma = np.broadcast_arrays(pitch, duty, sigma)
        shape = pitch.shape
        rows = np.stack(
            [
                pitch.ravel(),
                (duty * pitch).ravel(),
                sigma.ravel(),
                np.full(pitch.size, self.n_photons),
                np.full(pitch.size, self.background),
            ],
            axis=-1,
        )
        out = np.empty(pitch.size)
        with torch.no_grad():
            for start in range(0, pitch.size, chunk):
                mu = expected_counts(
                    torch.as_tensor(rows[start : start + chunk]),
                    self.grid,
                    self.background_weights,
                )[:, self.observed]
                log_l = (self.counts * torch.log(mu) - mu).sum(-1)
                out[start : start + chunk] = log_l.numpy()
        self.n_evaluations += pitch.size
        return out.reshape(shape)


def _local_maxima(profile: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of local maxima of a 1D profile within ``threshold`` of its maximum."""
    padded = np.concatenate([[-np.inf], profile, [-np.inf]])
    is_max = (padded[1:-1] >= padded[:-2]) & (padded[1:-1] > padded[2:])
    return np.flatnonzero(is_max & (profile >= profile.max() - threshold))


def _axis(low: float, high: float, bounds: tuple[float, float], n: int) -> np.ndarray:
    """``n`` cell centres covering [low, high] clipped to the prior bounds."""
    low, high = max(low, bounds[0]), min(high, bounds[1])
    if high <= low:
        high = min(low + 1e-9 * max(1.0, abs(low)), bounds[1])
        low = high - 1e-9 * max(1.0, abs(high))
    edges = np.linspace(low, high, n + 1)
    return 0.5 * (edges[1:] + edges[:-1])


def _refit_box(
    axes: list[np.ndarray], keep: np.ndarray, bounds: list[tuple[float, float]]
) -> tuple[list[tuple[float, float]], bool]:
    """The next grid box along each axis, and whether any side had to grow.

    Where the kept cells reach a side of the box (and the box is not at the prior's bound
    there), that side moves out by the box's width; otherwise the box shrinks to the kept
    cells plus 2.5 cells of margin on each side.
    """
    box, grew = [], False
    for dim, centres in enumerate(axes):
        other = tuple(d for d in range(keep.ndim) if d != dim)
        used = np.flatnonzero(keep.any(axis=other))
        step = centres[1] - centres[0]
        low_edge, high_edge = centres[0] - 0.5 * step, centres[-1] + 0.5 * step
        width = high_edge - low_edge
        low = centres[used[0]] - 2.5 * step
        high = centres[used[-1]] + 2.5 * step
        slack = 1e-6 * width  # a box clipped to the prior's bound is at that bound
        if used[0] == 0 and low_edge > bounds[dim][0] + slack:
            low, grew = low_edge - width, True
        if used[-1] == centres.size - 1 and high_edge < bounds[dim][1] - slack:
            high, grew = high_edge + width, True
        box.append((low, high))
    return box, grew


def _inside(point, axes: list[np.ndarray]) -> bool:
    """Whether ``point`` lies within the cells of a grid."""
    return all(
        a[0] - 0.5 * (a[1] - a[0]) <= x <= a[-1] + 0.5 * (a[1] - a[0])
        for x, a in zip(point, axes, strict=True)
    )


def reference_posterior(
    counts: np.ndarray,
    n_photons: float,
    background: float,
    prior: GratingPrior = GratingPrior(),
    grid: QGrid = QGrid(),
    n_samples: int = 10_000,
    seed: int = 0,
    threshold: float = 25.0,
    pitch_step_nm: float | None = None,
    cells_per_axis: int = 36,
    max_refits: int = 8,
    background_weights: np.ndarray | None = None,
    observed: np.ndarray | None = None,
) -> ReferencePosterior:
    """The exact posterior of (pitch, width, sigma) for one line-out with known nuisances.

    Args:
        counts: photon counts per q bin, shape (n_points,); the bins that ``observed``
            marks False are left out of the likelihood (their values may be NaN).
        n_photons, background: the nuisance parameters, taken as known.
        threshold: log-likelihood depth below the maximum that a mode's grid covers
            (25 leaves out less than 1e-10 of the mass).
        pitch_step_nm: step of the stage-1 pitch scan; must stay below the pitch basin
            (about p * dq / q_max, 0.3-0.8 nm on the default grid); ``None``: half the
            basin at the prior's smallest pitch, at most 0.1 nm.
        cells_per_axis: cells per axis of each mode's final 3D grid.
        max_refits: how often a mode's grid may grow before giving up (noted in
            :attr:`ReferencePosterior.notes`).
        background_weights: the instrument's relative background per bin (``None``: 1).
        observed: (n_points,) bool, the bins the line-out observes (``None``: all).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (grid.n_points,):
        raise ValueError(f"counts must have shape ({grid.n_points},), got {counts.shape}")
    observed = np.ones(grid.n_points, bool) if observed is None else np.asarray(observed, bool)
    if not np.isfinite(counts[observed]).all() or (counts[observed] < 0).any():
        raise ValueError("counts must be finite and non-negative in the observed bins")
    if not n_photons > 0 or not background >= 0:
        raise ValueError("n_photons must be positive and background non-negative")
    if pitch_step_nm is None:
        pitch_step_nm = min(0.1, 0.5 * prior.pitch_nm[0] * grid.resolution_nm / grid.q_max_nm)
    started = time.perf_counter()
    log_l = _Likelihood(counts, n_photons, background, grid, background_weights, observed)
    notes: list[str] = []

    # 1. pitch profile over the whole prior against a coarse (d, sigma) grid (d <= 0.5 suffices
    #    for the profile because the likelihood is symmetric in d <-> 1 - d)
    pitches = np.arange(prior.pitch_nm[0], prior.pitch_nm[1] + 1e-9, pitch_step_nm)
    duties = np.linspace(prior.duty[0], min(0.5, prior.duty[1]), 9)
    sigmas = np.linspace(*prior.sigma_nm, 10)
    coarse = log_l(pitches[:, None, None], duties[None, :, None], sigmas[None, None, :])
    profile = coarse.reshape(len(pitches), -1).max(axis=1)
    candidates = _local_maxima(profile, threshold)

    # 2.-3. refine each candidate pitch, then find the (d, sigma) regions at that pitch
    fine_duty = np.linspace(*prior.duty, 161)
    fine_sigma = np.linspace(*prior.sigma_nm, 96)
    regions: list[tuple[float, list[tuple[float, float]], float]] = []  # (pitch, box, peak)
    for index in candidates:
        best = np.unravel_index(coarse[index].argmax(), coarse[index].shape)
        near = np.linspace(pitches[index] - pitch_step_nm, pitches[index] + pitch_step_nm, 201)
        p_star = near[log_l(near, duties[best[0]], sigmas[best[1]]).argmax()]
        plane = log_l(p_star, fine_duty[:, None], fine_sigma[None, :])
        labels, n_labels = ndimage.label(plane >= plane.max() - threshold)
        for label in range(1, n_labels + 1):
            keep = labels == label
            used_d = np.flatnonzero(keep.any(axis=1))
            used_s = np.flatnonzero(keep.any(axis=0))
            d_box = (fine_duty[used_d[0]] - 0.01, fine_duty[used_d[-1]] + 0.01)
            s_box = (fine_sigma[used_s[0]] - 0.4, fine_sigma[used_s[-1]] + 0.4)
            regions.append((p_star, [d_box, s_box], float(plane[keep].max())))
    best_peak = max(peak for _, _, peak in regions)
    regions = [r for r in regions if r[2] >= best_peak - threshold]

    # 4. a local 3D grid per region, re-fitted until it holds the region's mass
    bounds = [prior.pitch_nm, prior.duty, prior.sigma_nm]
    masses, moments = [], []
    cells: list[tuple[list[np.ndarray], np.ndarray, float]] = []  # axes, log L, cell volume
    log_ref = best_peak
    regions.sort(key=lambda region: -region[2])
    for p_star, (d_box, s_box), _ in regions:
        if any(_inside((p_star, *np.mean([d_box, s_box], axis=1)), axes) for axes, _, _ in cells):
            continue  # a grid of a stronger region already holds this one
        box = [(p_star - pitch_step_nm, p_star + pitch_step_nm), d_box, s_box]
        for _ in range(max_refits):  # grow the box until the region lies inside it
            axes = [_axis(*b, bound, cells_per_axis) for b, bound in zip(box, bounds, strict=True)]
            values = log_l(axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
            box, grew = _refit_box(axes, values >= values.max() - threshold, bounds)
            if not grew:
                break
        else:
            notes.append(f"a mode's grid still grew after {max_refits} re-fits")
        # then fit it to the region, so that the final cells are as fine as they can be
        axes = [_axis(*b, bound, cells_per_axis) for b, bound in zip(box, bounds, strict=True)]
        values = log_l(axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
        peak = np.unravel_index(values.argmax(), values.shape)
        if any(
            _inside([a[i] for a, i in zip(axes, peak, strict=True)], other) for other, _, _ in cells
        ):
            continue  # it grew into a mode found before
        log_ref = max(log_ref, float(values.max()))
        volume = np.prod([a[1] - a[0] for a in axes])
        cells.append((axes, values, volume))
    for axes, values, volume in cells:
        mass = np.exp(values - log_ref) * volume
        masses.append(mass.sum())
        p, d, s = np.meshgrid(*axes, indexing="ij")
        params = np.stack([p, d * p, s], axis=-1).reshape(-1, 3)
        w = mass.ravel() / mass.sum()
        mean = w @ params
        sd = np.sqrt(np.maximum(w @ (params - mean) ** 2, 0.0))
        moments.append((mean, sd))

    total = float(np.sum(masses))
    rng = np.random.default_rng(seed)
    order = np.argsort(masses)[::-1]
    modes, samples = [], []
    counts_per_mode = rng.multinomial(n_samples, np.asarray(masses) / total)
    for rank in order:
        axes, values, _ = cells[rank]
        mean, sd = moments[rank]
        modes.append(
            ReferenceMode(
                weight=float(masses[rank] / total),
                mean=mean,
                sd=sd,
                pitch_range_nm=(float(axes[0][0]), float(axes[0][-1])),
                duty_range=(float(axes[1][0]), float(axes[1][-1])),
                sigma_range_nm=(float(axes[2][0]), float(axes[2][-1])),
            )
        )
        n = counts_per_mode[rank]
        if n == 0:
            continue
        probability = np.exp(values - values.max()).ravel()
        flat = rng.choice(probability.size, size=n, p=probability / probability.sum())
        idx = np.unravel_index(flat, values.shape)
        draws = []
        for dim, centres in enumerate(axes):
            step = centres[1] - centres[0] if centres.size > 1 else 0.0
            draws.append(centres[idx[dim]] + (rng.random(n) - 0.5) * step)
        p, d, s = draws
        samples.append(np.stack([p, d * p, s], axis=-1))
    if len(modes) > 2:
        notes.append(f"{len(modes)} separated regions (harmonics or a multi-modal ridge)")
    return ReferencePosterior(
        samples=rng.permutation(np.concatenate(samples)),
        modes=modes,
        n_evaluations=log_l.n_evaluations,
        wall_s=time.perf_counter() - started,
        notes=notes,
    )


@dataclass(frozen=True)
class NestedPosterior:
    """Draws of :func:`nested_sampling_posterior`."""

    #: (n_samples, 3): pitch_nm, width_nm, sigma_nm
    samples: np.ndarray
    #: dynesty's error estimate of the log evidence (a mode's weight is uncertain by about
    #: half of it, each mode holding half the live points)
    log_evidence_error: float
    wall_s: float


def nested_sampling_posterior(
    counts: np.ndarray,
    n_photons: float,
    background: float,
    prior: GratingPrior = GratingPrior(),
    grid: QGrid = QGrid(),
    nlive: int = 500,
    n_samples: int = 10_000,
    seed: int = 0,
    background_weights: np.ndarray | None = None,
    observed: np.ndarray | None = None,
) -> NestedPosterior:
    """The posterior of pitch, width and sigma by nested sampling (dynesty: multi-ellipsoid
    bounds, random walks), the photon count and background fixed as for
    :func:`reference_posterior` (``background_weights`` and ``observed`` too): an independent
    cross-check of the staged grids, and a peer in the benchmarks. Needs ``dynesty`` (in the
    ``dev`` extra); about 15-30 s per line-out.
    """
    import dynesty

    observed = np.ones(grid.n_points, bool) if observed is None else np.asarray(observed, bool)
    counts = np.asarray(counts, dtype=np.float64)[observed]

    def log_likelihood(x: np.ndarray) -> float:
        row = np.array([[x[0], x[1] * x[0], x[2], n_photons, background]])
        mu = expected_counts(row, grid, background_weights)[0][observed]
        return float((counts * np.log(mu) - mu).sum())

    def from_unit_cube(u: np.ndarray) -> np.ndarray:
        (p0, p1), (d0, d1), (s0, s1) = prior.pitch_nm, prior.duty, prior.sigma_nm
        return np.array([p0 + (p1 - p0) * u[0], d0 + (d1 - d0) * u[1], s0 + (s1 - s0) * u[2]])

    start = time.perf_counter()
    sampler = dynesty.NestedSampler(
        log_likelihood,
        from_unit_cube,
        3,
        nlive=nlive,
        bound="multi",
        sample="rwalk",
        rstate=np.random.default_rng(seed),
    )
    sampler.run_nested(dlogz=0.1, print_progress=False)
    results = sampler.results
    weights = np.exp(results.logwt - results.logz[-1])
    picks = np.random.default_rng(seed).choice(len(weights), n_samples, p=weights / weights.sum())
    draws = results.samples[picks]
    return NestedPosterior(
        samples=np.stack([draws[:, 0], draws[:, 1] * draws[:, 0], draws[:, 2]], axis=-1),
        log_evidence_error=float(results.logzerr[-1]),
        wall_s=time.perf_counter() - start,
    )


def mirror_weight(samples: np.ndarray) -> float:
    """Fraction of (pitch, width, ...) samples in the wide-line mode, width > pitch / 2."""
    return float(np.mean(samples[:, 1] > 0.5 * samples[:, 0]))


__all__ = [
    "REFERENCE_PARAMETERS",
    "ReferenceMode",
    "ReferencePosterior",
    "mirror_weight",
    "reference_posterior",
]
