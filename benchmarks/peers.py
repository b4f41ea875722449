"""The shipped model against the exact answer and nested sampling, on the same exposures
(issue: benchmarks); sbi's NPE from the posterior-model comparison beside them.

For ``--exposures`` simulated line-outs (prior draws, seeded), each method's time per
exposure and its distance to the exact posterior:

- **cINN** (the shipped model): 1,000 samples, one thread, eager (the compiled sampler's
  time is in ``sampling.json``); it infers the photon count and background too;
- **exact**: the staged-grid posterior of :func:`pipeline.physics.reference.reference_posterior`
  (photon count and background fixed at their true values), 10,000 draws;
- **nested sampling**: dynesty (``nlive`` 500, multi-ellipsoid bounds, random walks) on the
  same likelihood and prior, nuisances fixed as for the exact one.

Distances to the exact draws, per parameter (the width folded to the narrow-line solution,
min(w, p - w), as both solutions are equally likely): the ratio of posterior sds and the
difference of means in exact sds, medians over the exposures. The accuracy of sbi's NPE and
of the cINN on the validation diagnostics, and their sampling times, come from the stored
run of ``python -m benchmarks.posterior_models score`` (the peer models are trained by that
benchmark, hours on a CPU).

Run: ``python -m benchmarks.peers [--exposures 5]`` (results in
``benchmarks/results/peers.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import save
from pipeline.model import load
from pipeline.model.allocator import retain_freed_memory
from pipeline.physics import simulate
from pipeline.physics.reference import nested_sampling_posterior, reference_posterior

RESULTS = Path(__file__).parent / "results" / "peers.json"
STORED = Path(__file__).parent / "results" / "posterior_models.json"
SHOWN = ("pitch_nm", "width_nm", "sigma_nm")


def _folded(samples: np.ndarray) -> np.ndarray:
    """pitch, min(width, pitch - width), sigma."""
    pitch, width = samples[:, 0], samples[:, 1]
    return np.stack([pitch, np.minimum(width, pitch - width), samples[:, 2]], axis=-1)


def _distance(draws: np.ndarray, exact: np.ndarray) -> dict[str, list[float]]:
    ours, truth = _folded(draws), _folded(exact)
    sd = truth.std(0)
    return {
        "sd_ratio": (ours.std(0) / sd).tolist(),
        "bias_in_exact_sd": (np.abs(ours.mean(0) - truth.mean(0)) / sd).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exposures", type=int, default=5)
    parser.add_argument("--no-nested", action="store_true", help="leave out nested sampling")
    args = parser.parse_args()
    retain_freed_memory()
    torch.set_num_threads(1)
    model = load(device="cpu")
    theta, counts = simulate(args.exposures, np.random.default_rng(77))
    times: dict[str, list[float]] = {"cinn": [], "exact": [], "nested": []}
    distances: dict[str, list[dict]] = {"cinn": [], "nested": []}
    model.sample(counts[:1], 1000, seed=0)  # warm-up
    for row in range(args.exposures):
        n_photons, background = float(theta[row, 3]), float(theta[row, 4])
        start = time.perf_counter()
        exact = reference_posterior(counts[row], n_photons, background, seed=row).samples
        times["exact"].append(time.perf_counter() - start)
        start = time.perf_counter()
        draws = model.sample(counts[row : row + 1], 1000, seed=row)[0]
        times["cinn"].append(time.perf_counter() - start)
        distances["cinn"].append(_distance(draws, exact))
        if not args.no_nested:
            start = time.perf_counter()
            draws = nested_sampling_posterior(counts[row], n_photons, background, seed=row).samples
            times["nested"].append(time.perf_counter() - start)
            distances["nested"].append(_distance(draws, exact))
        print(row, {k: round(v[-1], 4) for k, v in times.items() if v}, flush=True)

    def summary(method: str) -> dict:
        out: dict = {
            "seconds_per_exposure": {
                "median": float(np.median(times[method])),
                "min": float(min(times[method])),
                "max": float(max(times[method])),
            }
        }
        if distances.get(method):
            for key in ("sd_ratio", "bias_in_exact_sd"):
                values = np.array([d[key] for d in distances[method]])
                out[key] = dict(zip(SHOWN, np.median(values, axis=0).tolist(), strict=True))
        return out

    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": 1},
        "exposures": args.exposures,
        "methods": {m: summary(m) for m in times if times[m]},
        "targets": {"speed_up_over_exact_min": 1e4, "speed_up_over_sbi_npe_min": 10.0},
    }
    exact_s = report["methods"]["exact"]["seconds_per_exposure"]["median"]
    cinn_s = report["methods"]["cinn"]["seconds_per_exposure"]["median"]
    report["speed_up_over_exact"] = exact_s / cinn_s
    if STORED.is_file():
        stored = json.loads(STORED.read_text())["models"]
        keep = ("sampling_ms_1000_one_thread", "simulation", "reference")
        report["stored_posterior_models"] = {
            name: {k: stored[name][k] for k in keep if k in stored[name]}
            for name in ("grating-cinn", "sbi-npe-4k", "cinn-4k")
            if name in stored
        }
    RESULTS.parent.mkdir(exist_ok=True)
    save(RESULTS, report)
    print(json.dumps({k: v for k, v in report.items() if k != "stored_posterior_models"}, indent=2))


if __name__ == "__main__":
    main()
