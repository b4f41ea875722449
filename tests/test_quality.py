"""The posterior-predictive quality flag: raised on line-outs a grating cannot explain, and
rarely on gratings."""

import numpy as np
import pytest

from pipeline.model import load
from pipeline.physics import simulate
from pipeline.physics.quality import (
    N_DRAWS,
    Z_THRESHOLD,
    background_counts,
    predictive_z,
    sphere_counts,
)


@pytest.fixture(scope="module")
def model():
    return load(device="cpu")


def _z(model, counts: np.ndarray, seed: int) -> np.ndarray:
    return predictive_z(counts, model.sample(counts, N_DRAWS, seed=seed), model.grid, seed=seed)


def test_gratings_are_rarely_flagged(model):
    _, counts = simulate(400, np.random.default_rng(77))  # not the calibration's exposures
    z = _z(model, counts, seed=1)
    assert (z > Z_THRESHOLD).mean() <= 0.03  # calibrated at 1%
    assert abs(np.median(z)) < 1.0


def test_spheres_and_background_are_flagged(model):
    rng = np.random.default_rng(78)
    spheres, _ = sphere_counts(100, rng, model.grid)
    assert (_z(model, spheres, seed=2) > Z_THRESHOLD).all()
    assert (_z(model, background_counts(100, rng, model.grid), seed=3) > Z_THRESHOLD).mean() >= 0.85
