"""Posterior-predictive check: can the grating model explain this line-out at all?

A posterior drawn for a sample that is not a grating (a sphere, pure background, a
detector artefact) still looks like a posterior. The check re-simulates the line-out from
``n_draws`` posterior draws and compares the observed counts with those replicas:

- ``mu_k = expected_counts(theta_k)`` for each draw; ``mu_bar`` their mean per bin;
- the realized discrepancy of counts ``y`` with draw ``k`` is the Poisson deviance
  ``D(y, mu_k) = 2 sum [y log(y/mu_k) - (y - mu_k)]`` over the bins;
- replicas ``y_k ~ Poisson(mu_k)`` give ``D(y_k, mu_k)``, the discrepancy the model itself
  produces (this calibrates for low counts, where the deviance of one bin is far from 1);
- ``z = (mean_k D(y, mu_k) - mean_k D(y_k, mu_k)) / sd_k D(y_k, mu_k)``: near 0 for a
  line-out the model explains, large for one it cannot (a sphere's: about 20,000). An
  exposure is flagged when ``z`` exceeds :data:`Z_THRESHOLD`.

Comparing with each draw's own prediction (not with the posterior-predictive mean) keeps the
check sharp when a posterior for a foreign sample is broad: every draw then misfits. Its
price is a heavy upper tail on gratings too: where many photons make the deviance sensitive,
the posterior's own width (sd ratio 1.1-1.2 against the exact posterior) shows as misfit,
so the threshold sits at the tail's 99th percentile.

Example:
    >>> import numpy as np
    >>> from pipeline.physics import simulate
    >>> theta, counts = simulate(2, np.random.default_rng(0))
    >>> draws = np.repeat(theta[:, None, :], 50, axis=1)  # the truth as a (perfect) posterior
    >>> z = predictive_z(counts, draws, seed=0)
    >>> bool((np.abs(z) < 5).all())
    True

References:
    Gelman, Meng & Stern (1996), "Posterior predictive assessment of model fitness via
    realized discrepancies", Statistica Sinica 6, 733-807.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.physics.grating import GratingPrior, QGrid, _namespace, expected_counts

#: Flag threshold on ``z``: about the 99th percentile of ``z`` (38.8) over 4,000 grating
#: exposures drawn from the prior with the shipped model's posteriors, so about 1% false
#: positives; it flags 100% of 1,000 sphere and 92.7% of 1,000 flat-background exposures
#: (``python -m benchmarks.quality``, docs/model.md).
Z_THRESHOLD = 40.0
#: Posterior draws re-simulated per exposure.
N_DRAWS = 32


def _deviance(counts: Any, mu: Any) -> Any:
    """Poisson deviance summed over the last axis (numpy arrays or torch tensors)."""
    xp = _namespace(mu)
    with np.errstate(divide="ignore", invalid="ignore"):
        term = xp.where(counts > 0, counts * xp.log(counts / mu), 0.0)
    return 2.0 * (term - (counts - mu)).sum(-1)


def predictive_z(
    counts: Any,
    samples: Any,
    grid: QGrid = QGrid(),
    n_draws: int = N_DRAWS,
    seed: int | None = None,
    background_weights: np.ndarray | None = None,
    observed: np.ndarray | None = None,
) -> Any:
    """``z`` of each exposure's observed discrepancy among its replicas, over the observed
    bins (``observed``, (n_points,) bool; all when ``None``: the values of the others are
    not used, NaN included) with the instrument's ``background_weights``.

    Works on numpy arrays and on torch tensors (then on their device, so that a GPU worker
    checks its posteriors where it drew them), in float64 either way; the replicas' random
    numbers differ between the two, so the ``z`` of one exposure differs by Monte Carlo
    error only.

    Args:
        counts: (exposures, n_points) observed counts.
        samples: (exposures, samples, 5) posterior draws; the first ``n_draws`` are used
            (draws are independent, so any subset is a fair one).
        grid: the line-outs' q grid.
        n_draws: draws re-simulated per exposure.
        seed: for the Poisson replicas.
    """
    xp = _namespace(samples)
    keep = slice(None) if observed is None else np.flatnonzero(observed)
    if xp is np:
        counts = np.asarray(counts, dtype=np.float64)[:, keep]
        draws = np.asarray(samples[:, :n_draws], dtype=np.float64)
        mu = expected_counts(draws, grid, background_weights)[..., keep].clip(1e-12)
        replicas = np.random.default_rng(seed).poisson(mu).astype(np.float64)
    else:
        if observed is not None:
            keep = xp.as_tensor(keep, device=counts.device)
        counts = counts.to(xp.float64)[:, keep]
        mu = expected_counts(samples[:, :n_draws].to(xp.float64), grid, background_weights)
        mu = mu[..., keep].clamp(min=1e-12)
        generator = xp.Generator(device=mu.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        replicas = xp.poisson(mu, generator=generator)
    return z_of_replicas(counts, mu, replicas)


def z_of_replicas(counts: Any, mu: Any, replicas: Any) -> Any:
    """:func:`predictive_z` for given expected counts ``mu`` (exposures, draws, bins) and
    Poisson ``replicas`` of them (numpy arrays or torch tensors)."""
    observed = _deviance(counts[:, None, :], mu)  # (exposures, draws)
    replicated = _deviance(replicas, mu)
    spread = replicated.std(1, ddof=1) if _namespace(mu) is np else replicated.std(1)
    return (observed.mean(1) - replicated.mean(1)) / (spread.clip(1e-12, None))


def _nuisances(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    prior = GratingPrior()
    return 10.0 ** rng.uniform(*prior.log10_n_photons, n), rng.uniform(*prior.background, n)


def sphere_counts(n: int, rng: np.random.Generator, grid: QGrid) -> tuple[np.ndarray, np.ndarray]:
    """Counts of dilute polydisperse spheres, a sample the grating model cannot explain: form
    factor ``(3 (sin x - x cos x) / x^3)^2``, ``x = q R``, R uniform in 20-100 nm with 10%
    Gaussian spread, photons and background from the grating prior's ranges; also returns
    the photons of each."""
    q = grid.q_nm
    radius = rng.uniform(20.0, 100.0, n)[:, None] * (1 + 0.1 * rng.standard_normal((n, 64)))
    x = q[None, None, :] * radius[..., None]
    form = (3 * (np.sin(x) - x * np.cos(x)) / x**3) ** 2
    shape = form.mean(axis=1)
    photons, background = _nuisances(n, rng)
    mu = photons[:, None] * shape / shape.sum(-1, keepdims=True) + background[:, None]
    return rng.poisson(mu).astype(np.float64), photons


def background_counts(n: int, rng: np.random.Generator, grid: QGrid) -> np.ndarray:
    """Counts of a flat background only (0.05-5 counts per bin): no sample at all."""
    level = rng.uniform(0.05, 5.0, n)[:, None]
    return rng.poisson(np.broadcast_to(level, (n, grid.n_points))).astype(np.float64)
