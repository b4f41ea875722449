"""Quick calibration checks of a posterior model on held-out simulations.

The full diagnostics (SBC, coverage curves, comparison with the exact posterior) belong to
``beamline-inn validate``; this module measures what the model card of a first model needs:
for each parameter, how often the truth falls in the central 50% and 90% credible intervals
(ideal: 0.5 and 0.9), and how much narrower the posterior is than the prior (contraction).

Example:
    >>> from pipeline.model import Architecture, PosteriorModel
    >>> tiny = PosteriorModel(Architecture(n_blocks=1, hidden=8, condition_dim=4, condition_hidden=8))
    >>> report = calibration_report(tiny, n_exposures=8, n_samples=50)
    >>> sorted(report["coverage_90"])[:2]
    ['background', 'n_photons']
"""

from __future__ import annotations

import numpy as np

from pipeline.model.posterior import PosteriorModel
from pipeline.physics import simulate


def calibration_report(
    model: PosteriorModel, n_exposures: int = 200, n_samples: int = 1000, seed: int = 12345
) -> dict:
    """Coverage of central 50%/90% intervals and posterior/prior sd ratio per parameter."""
    rng = np.random.default_rng(seed)
    theta, counts = simulate(n_exposures, rng, model.prior, model.grid)
    samples = model.sample(counts, n_samples, seed=seed).astype(np.float64)
    prior_sd = model.prior.sample(100_000, rng).std(axis=0)
    report: dict = {"n_exposures": n_exposures, "n_samples": n_samples, "seed": seed}
    for level in (0.5, 0.9):
        low, high = np.quantile(samples, [0.5 - level / 2, 0.5 + level / 2], axis=1)
        inside = (theta >= low) & (theta <= high)
        report[f"coverage_{round(100 * level)}"] = dict(
            zip(model.parameter_names, inside.mean(axis=0).round(3).tolist(), strict=True)
        )
    contraction = np.median(samples.std(axis=1) / prior_sd, axis=0)
    report["median_sd_over_prior_sd"] = dict(
        zip(model.parameter_names, contraction.round(5).tolist(), strict=True)
    )
    return report
