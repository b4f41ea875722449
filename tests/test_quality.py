"""The posterior-predictive quality flag: raised on line-outs a grating cannot explain, and
rarely on gratings."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.instrument import load_instrument
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


def test_the_torch_check_equals_numpy_s_and_flags_the_same_line_outs(model):
    """A GPU worker checks its posteriors with torch where it drew them: the same arithmetic
    as numpy's (equal for the same replicas), the same flags."""
    import torch

    from pipeline.physics import expected_counts
    from pipeline.physics.quality import z_of_replicas

    rng = np.random.default_rng(79)
    _, gratings = simulate(60, rng)
    spheres, _ = sphere_counts(20, rng, model.grid)
    counts = np.concatenate([gratings, spheres])
    draws = model.sample(counts, N_DRAWS, seed=4)
    mu = expected_counts(draws.astype(np.float64), model.grid).clip(1e-12)
    replicas = rng.poisson(mu).astype(np.float64)
    as_numpy = z_of_replicas(counts.astype(np.float64), mu, replicas)
    as_torch = z_of_replicas(*(torch.from_numpy(a) for a in (counts * 1.0, mu, replicas)))
    np.testing.assert_allclose(as_torch.numpy(), as_numpy, rtol=1e-9)

    z = predictive_z(torch.from_numpy(counts), torch.from_numpy(draws), model.grid, seed=4)
    assert z.dtype == torch.float64
    flagged = z.numpy() > Z_THRESHOLD
    np.testing.assert_array_equal(flagged, _z(model, counts, seed=4) > Z_THRESHOLD)
    assert flagged[60:].all() and flagged[:60].mean() <= 0.05


def test_the_check_uses_the_instruments_bins_and_background_weights():
    """On the Pilatus sector instrument (masked bins NaN, background per pixel) the truth
    explains its line-outs with the instrument's weights, and does not with a background
    spread evenly over the bins."""
    instrument = load_instrument(
        Path(__file__).parents[1] / "pipeline" / "data" / "pilatus1m-5m-sector.instrument.json"
    )
    rng = np.random.default_rng(4)
    theta = instrument.grating_prior.sample(40, rng)
    theta[:, 4] = 8.0  # background enough to tell how it is spread
    counts = np.where(instrument.observed, rng.poisson(instrument.expected_counts(theta)), np.nan)
    truth = np.repeat(theta[:, None, :], N_DRAWS, axis=1)
    options = {"observed": instrument.observed, "seed": 0}
    z = predictive_z(
        counts, truth, instrument.grid, background_weights=instrument.weights, **options
    )
    assert np.isfinite(z).all() and np.median(np.abs(z)) < 2
    uniform = predictive_z(counts, truth, instrument.grid, **options)
    assert np.median(uniform) > 10 * max(1.0, np.median(np.abs(z)))
