"""Diagnostics of a posterior model: calibration on simulations and distance to the exact posterior.

Two sets of measures (definitions as in sbi and BayesFlow):

**On simulations from the prior** (:func:`simulation_diagnostics`, >= 200 exposures):

- *SBC*: the rank of the true value among the posterior draws; for a calibrated posterior it
  is uniform, tested per parameter with a Kolmogorov-Smirnov test (p-value).
- *Expected coverage*: how often the truth falls in the central interval of credibility
  0.05, 0.10, ..., 0.95; the *calibration error* is the median of |coverage - credibility|.
- *Contraction*: 1 - posterior variance / prior variance (median over exposures).
- *z-score*: (posterior mean - truth) / posterior sd (mean and sd over exposures).
- *Re-simulation error*: the posterior predictive check: expected counts of 50 posterior draws
  against the observed counts, as a reduced chi-square per exposure (variance floored at one
  count; about 1 when the model explains the data, less where most bins expect < 1 count);
  median over exposures.

**Against the exact posterior** (:func:`reference_diagnostics`, >= 20 exposures, the
nuisances taken as known by the reference): the weight of the wide-line mode (width > p/2)
and its error; within the narrow-line mode, the ratio of posterior sds (model / exact) and
the bias of the mean in units of the exact sd; and a classifier two-sample test (C2ST) on
(pitch, width, sigma): the 5-fold cross-validated accuracy of a k-nearest-neighbour classifier
(k = 5, coordinates standardised) telling model draws from exact ones; 0.5 means
indistinguishable.

Example:
    >>> from pipeline.model import Architecture, PosteriorModel
    >>> tiny = PosteriorModel(Architecture(n_blocks=1, hidden=8, condition_dim=4, condition_hidden=8))
    >>> report, _ = simulation_diagnostics(tiny, n_exposures=20, n_samples=50)
    >>> sorted(report)[:3]
    ['calibration_error', 'contraction', 'coverage']
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import stats
from scipy.spatial import cKDTree

from pipeline.model.posterior import CountsSampler
from pipeline.physics import GRATING_PARAMETERS
from pipeline.physics.reference import mirror_weight, reference_posterior

CREDIBILITY_LEVELS = np.round(np.arange(0.05, 0.96, 0.05), 2)


def _by_name(names: tuple[str, ...], values: np.ndarray) -> dict[str, float]:
    return {name: float(value) for name, value in zip(names, values, strict=True)}


def simulation_diagnostics(
    model: CountsSampler, n_exposures: int = 200, n_samples: int = 1000, seed: int = 2024
) -> tuple[dict, dict]:
    """SBC, coverage, contraction, z-scores and re-simulation error on prior simulations.

    Returns the JSON-able report and the arrays behind it (for the figures).
    """
    rng = np.random.default_rng(seed)
    theta, counts = model.instrument.simulate(n_exposures, rng)
    samples = model.sample(counts, n_samples, seed=seed).astype(np.float64)
    names = model.parameter_names

    ranks = (samples < theta[:, None, :]).sum(axis=1)  # (exposures, parameters), 0..n_samples
    uniform = (ranks + rng.random(ranks.shape)) / (n_samples + 1)
    sbc_p = np.array([stats.kstest(uniform[:, j], "uniform").pvalue for j in range(len(names))])

    coverage = np.empty((len(CREDIBILITY_LEVELS), len(names)))
    for i, level in enumerate(CREDIBILITY_LEVELS):
        low, high = np.quantile(samples, [0.5 - level / 2, 0.5 + level / 2], axis=1)
        coverage[i] = ((theta >= low) & (theta <= high)).mean(axis=0)
    calibration_error = np.median(np.abs(coverage - CREDIBILITY_LEVELS[:, None]), axis=0)

    prior_var = model.prior.sample(100_000, rng).var(axis=0)
    contraction = np.median(1.0 - samples.var(axis=1) / prior_var, axis=0)
    z = (samples.mean(axis=1) - theta) / samples.std(axis=1)

    draws = samples[:, rng.choice(n_samples, size=min(50, n_samples), replace=False)]
    observed = model.instrument.observed
    mu = model.instrument.expected_counts(draws.reshape(-1, draws.shape[-1])).reshape(
        *draws.shape[:2], -1
    )[..., observed]
    residual = counts[:, None, observed] - mu
    chi2 = (residual**2 / np.maximum(mu, 1.0)).mean(axis=-1).mean(axis=1)

    report = {
        "n_exposures": n_exposures,
        "n_samples": n_samples,
        "seed": seed,
        "sbc_ks_p": _by_name(names, sbc_p),
        "calibration_error": _by_name(names, calibration_error),
        "coverage": {
            "levels": CREDIBILITY_LEVELS.tolist(),
            **{name: coverage[:, j].round(4).tolist() for j, name in enumerate(names)},
        },
        "contraction": _by_name(names, contraction),
        "z_mean": _by_name(names, z.mean(axis=0)),
        "z_sd": _by_name(names, z.std(axis=0)),
        "resimulation_chi2_median": float(np.median(chi2)),
    }
    return report, {"ranks": ranks, "coverage": coverage, "n_samples": n_samples, "names": names}


def c2st_knn(a: np.ndarray, b: np.ndarray, k: int = 5, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated accuracy of a k-NN classifier separating samples ``a`` from ``b``."""
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    a, b = a[rng.permutation(len(a))[:n]], b[rng.permutation(len(b))[:n]]
    x = np.concatenate([a, b])
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-12)
    y = np.repeat([0, 1], n)
    fold = rng.permutation(2 * n) % folds
    correct = 0
    for f in range(folds):
        train, test = fold != f, fold == f
        _, neighbours = cKDTree(x[train]).query(x[test], k=k)
        votes = y[train][neighbours].mean(axis=1)
        correct += int(((votes > 0.5) == y[test]).sum())
    return correct / (2 * n)


def _narrow(samples: np.ndarray) -> np.ndarray:
    """The draws of the narrow-line mode (width < pitch / 2), as (pitch, width, sigma)."""
    return samples[samples[:, 1] < 0.5 * samples[:, 0]][:, :3]


def _exact_posterior(
    counts: np.ndarray,
    theta: np.ndarray,
    model: CountsSampler,
    n_samples: int,
    seed: int,
    cache_dir: Path | None,
) -> tuple[np.ndarray, int, float]:
    """Exact posterior draws, number of modes and wall time, read from ``cache_dir`` if there."""
    key = hashlib.sha256(
        counts.tobytes()
        + theta.tobytes()
        + repr((model.prior, model.grid, n_samples, seed)).encode()
        + (b"" if model.instrument.is_uniform else model.instrument.sha256().encode())
    ).hexdigest()[:24]
    cached = cache_dir / f"exact-{key}.npz" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        with np.load(cached, allow_pickle=False) as data:
            return data["samples"], int(data["modes"]), float(data["wall_s"])
    instrument = model.instrument
    exact = reference_posterior(
        counts,
        theta[3],
        theta[4],
        model.prior,
        model.grid,
        n_samples,
        seed,
        background_weights=instrument.weights,
        observed=instrument.observed,
    )
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cached, samples=exact.samples, modes=len(exact.modes), wall_s=exact.wall_s)
    return exact.samples, len(exact.modes), exact.wall_s


def reference_diagnostics(
    model: CountsSampler,
    n_exposures: int = 20,
    n_samples: int = 4000,
    seed: int = 4048,
    progress: Callable[[int, int], None] | None = None,
    cache_dir: Path | None = None,
) -> tuple[dict, dict]:
    """Mode weights, sd ratios, bias and C2ST of the model against the exact posterior.

    With ``cache_dir``, exact posteriors are stored there and reused (keyed by the exposure,
    prior, grid, sample count and seed), so that several models are compared on the same
    exact draws at the cost of one.
    """
    rng = np.random.default_rng(seed)
    theta, counts = model.instrument.simulate(n_exposures, rng)
    samples = model.sample(counts, n_samples, seed=seed).astype(np.float64)
    rows, examples = [], []
    for i in range(n_exposures):
        exact_samples, n_modes, wall_s = _exact_posterior(
            counts[i], theta[i], model, n_samples, seed + i, cache_dir
        )
        mine = samples[i]
        separated = n_modes >= 2
        row = {
            "truth": theta[i].tolist(),
            "modes": n_modes,
            "exact_wide_weight": mirror_weight(exact_samples),
            "model_wide_weight": mirror_weight(mine),
            "c2st": c2st_knn(mine[:, :3], exact_samples, seed=seed + i),
            "reference_s": wall_s,
        }
        row["mode_weight_error"] = (
            abs(row["model_wide_weight"] - row["exact_wide_weight"]) if separated else None
        )
        mine_mode, exact_mode = (
            (_narrow(mine), _narrow(exact_samples)) if separated else (mine[:, :3], exact_samples)
        )
        if len(mine_mode) > 10 and len(exact_mode) > 10:
            exact_sd = exact_mode.std(axis=0)
            row["sd_ratio"] = (mine_mode.std(axis=0) / exact_sd).tolist()
            row["bias_in_exact_sd"] = (
                np.abs(mine_mode.mean(axis=0) - exact_mode.mean(axis=0)) / exact_sd
            ).tolist()
        rows.append(row)
        if i < 3:
            examples.append((mine[:, :3], exact_samples, theta[i, :3]))
        if progress:
            progress(i + 1, n_exposures)

    names = GRATING_PARAMETERS
    weight_errors = [r["mode_weight_error"] for r in rows if r["mode_weight_error"] is not None]
    sd_ratio = np.array([r["sd_ratio"] for r in rows if "sd_ratio" in r])
    bias = np.array([r["bias_in_exact_sd"] for r in rows if "bias_in_exact_sd" in r])
    report = {
        "n_exposures": n_exposures,
        "n_samples": n_samples,
        "seed": seed,
        "mode_weight_error_max": max(weight_errors) if weight_errors else None,
        "mode_weight_error_median": float(np.median(weight_errors)) if weight_errors else None,
        "sd_ratio_median": _by_name(names, np.median(sd_ratio, axis=0)),
        "bias_in_exact_sd_median": _by_name(names, np.median(bias, axis=0)),
        "c2st_median": float(np.median([r["c2st"] for r in rows])),
        "reference_s_median": float(np.median([r["reference_s"] for r in rows])),
        "exposures": rows,
    }
    return report, {"examples": examples}


def write_figures(simulation: dict, reference: dict, out_dir: Path) -> list[str]:
    """Coverage curves, SBC histograms and model-vs-exact corner plots as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    names = simulation["names"]

    figure, axis = plt.subplots(figsize=(5, 5))
    for j, name in enumerate(names):
        axis.plot(CREDIBILITY_LEVELS, simulation["coverage"][:, j], marker=".", label=name)
    axis.plot([0, 1], [0, 1], "k--", lw=1)
    axis.set(
        xlabel="credibility level",
        ylabel="expected coverage",
        title="Coverage of central intervals",
    )
    axis.legend()
    figure.savefig(out_dir / "coverage.png", dpi=100, bbox_inches="tight")
    written.append(str(out_dir / "coverage.png"))

    figure, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 2.8))
    for j, (axis, name) in enumerate(zip(axes, names, strict=True)):
        axis.hist(
            simulation["ranks"][:, j], bins=20, range=(0, simulation["n_samples"]), color="C0"
        )
        axis.axhline(len(simulation["ranks"]) / 20, color="k", ls="--", lw=1)
        axis.set(title=name, xlabel="rank of truth")
    figure.tight_layout()
    figure.savefig(out_dir / "sbc.png", dpi=100, bbox_inches="tight")
    written.append(str(out_dir / "sbc.png"))

    labels = ("pitch [nm]", "width [nm]", "sigma [nm]")
    for n, (mine, exact, truth) in enumerate(reference["examples"]):
        figure, axes = plt.subplots(3, 3, figsize=(8, 8))
        for r in range(3):
            for c in range(3):
                axis = axes[r, c]
                if c > r:
                    axis.axis("off")
                    continue
                if r == c:
                    low = min(mine[:, c].min(), exact[:, c].min())
                    high = max(mine[:, c].max(), exact[:, c].max())
                    bins = np.linspace(low, high, 60)
                    axis.hist(exact[:, c], bins=bins, density=True, alpha=0.6, label="exact")
                    axis.hist(mine[:, c], bins=bins, density=True, alpha=0.6, label="model")
                    axis.axvline(truth[c], color="k", lw=1)
                else:
                    axis.plot(exact[:, c], exact[:, r], ",", alpha=0.3, label="exact")
                    axis.plot(mine[:, c], mine[:, r], ",", alpha=0.3, label="model")
                    axis.plot(truth[c], truth[r], "k+")
                if r == 2:
                    axis.set_xlabel(labels[c])
                if c == 0 and r > 0:
                    axis.set_ylabel(labels[r])
        axes[0, 0].legend(fontsize=8)
        figure.suptitle(f"Model vs exact posterior, exposure {n}")
        path = out_dir / f"corner_{n}.png"
        figure.savefig(path, dpi=90, bbox_inches="tight")
        written.append(str(path))
    plt.close("all")
    return written
