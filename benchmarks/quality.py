"""Calibrating the posterior-predictive quality flag (issue: results store).

``z`` (:mod:`pipeline.physics.quality`) with the shipped model's posteriors for three kinds
of line-out on the model's q grid, with photon counts and backgrounds from the prior's
ranges:

- **grating**: simulated from the prior (what the model should explain);
- **sphere**: dilute polydisperse spheres (:func:`~pipeline.physics.quality.sphere_counts`);
- **background**: a flat background only (:func:`~pipeline.physics.quality.background_counts`).

It reports the percentiles of ``z`` on gratings (the flag's threshold is their 99th, so 1%
false positives) and the fraction flagged of each kind at :data:`Z_THRESHOLD`.

Run: ``python -m benchmarks.quality [--exposures 2000] [--model NAME]``
(results in ``benchmarks/results/quality.json``, for another model than the default in
``quality-NAME.json``). Line-outs are of the model's instrument: gratings with its background
weights, every kind with its masked bins left out of ``z``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import save
from pipeline.model import load
from pipeline.physics.quality import (
    N_DRAWS,
    Z_THRESHOLD,
    background_counts,
    predictive_z,
    sphere_counts,
)

RESULTS = Path(__file__).parent / "results" / "quality.json"


def z_scores(model, counts: np.ndarray, seed: int) -> np.ndarray:
    out = []
    for first in range(0, len(counts), 64):
        rows = counts[first : first + 64]
        samples = model.sample(rows, N_DRAWS, seed=seed + first)
        out.append(
            predictive_z(
                rows,
                samples,
                model.grid,
                seed=seed + first,
                background_weights=model.instrument.weights,
                observed=model.instrument.observed,
            )
        )
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exposures", type=int, default=2000)
    parser.add_argument("--model", default="default", help="a bundled model's name or a file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load(args.model, device="cpu")
    rng = np.random.default_rng(2026)
    n_other = max(1, args.exposures // 4)
    start = time.perf_counter()
    spheres, sphere_photons = sphere_counts(n_other, rng, model.grid)
    z = {
        "grating": z_scores(model, model.instrument.simulate(args.exposures, rng)[1], 1),
        "sphere": z_scores(model, spheres, 2),
        "background": z_scores(model, background_counts(n_other, rng, model.grid), 3),
    }
    bright = sphere_photons >= 1e4
    grating = z["grating"]
    report = {
        "machine": {"platform": platform.platform()},
        "model": args.model,
        "exposures": {kind: int(values.size) for kind, values in z.items()},
        "draws_per_exposure": N_DRAWS,
        "grating_z_percentiles": {
            str(p): round(float(np.percentile(grating, p)), 2)
            for p in (1, 50, 90, 95, 98, 99, 99.5, 99.9)
        },
        "threshold": Z_THRESHOLD,
        "flagged_fraction_at_grating_99th_percentile": {
            kind: round(float((values > np.percentile(grating, 99)).mean()), 4)
            for kind, values in z.items()
        },
        "flagged_fraction": {
            kind: round(float((values > Z_THRESHOLD).mean()), 4) for kind, values in z.items()
        },
        "sphere_flagged_fraction_by_photons": {
            "below_1e4": round(float((z["sphere"][~bright] > Z_THRESHOLD).mean()), 4),
            "1e4_and_above": round(float((z["sphere"][bright] > Z_THRESHOLD).mean()), 4),
        },
        "median_z": {kind: round(float(np.median(values)), 1) for kind, values in z.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    out = (
        RESULTS
        if args.model == "default"
        else RESULTS.with_name(f"quality-{Path(args.model).stem}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save(out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
