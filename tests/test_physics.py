import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.instrument import load_instrument
from pipeline.physics import PARAMETER_NAMES, GratingPrior, QGrid, expected_counts, simulate

PILATUS = Path(__file__).parents[1] / "pipeline" / "data" / "pilatus1m-5m-sector.instrument.json"

GRID = QGrid()


def test_grid_is_the_design_grid():
    q = GRID.q_nm
    assert q.shape == (512,)
    assert q[0] == pytest.approx(0.01) and q[-1] == pytest.approx(0.40)
    low, high = GRID.radial_range_nm
    assert high - low == pytest.approx(512 * GRID.bin_width_nm)


def test_width_and_its_mirror_give_identical_counts(rng):
    theta = GratingPrior().sample(64, rng)
    mirror = theta.copy()
    mirror[:, 1] = theta[:, 0] - theta[:, 1]
    np.testing.assert_allclose(
        expected_counts(mirror, GRID), expected_counts(theta, GRID), rtol=1e-10
    )


def test_expected_counts_sum_to_photons_plus_background(rng):
    theta = GratingPrior().sample(32, rng)
    mu = expected_counts(theta, GRID)
    np.testing.assert_allclose(mu.sum(-1), theta[:, 3] + 512 * theta[:, 4], rtol=1e-10)
    assert (mu >= theta[:, 4:5] - 1e-9).all()


@pytest.mark.parametrize("pitch", [120.0, 200.0, 290.0])
def test_peaks_sit_at_the_grating_orders(pitch):
    # sharp resolution, no roughness, no background: local maxima at q_n = 2 pi n / p
    grid = QGrid(q_min_nm=0.01, q_max_nm=0.40, n_points=20001, resolution_nm=1.5e-3)
    theta = np.array([[pitch, 0.237 * pitch, 1.0, 1e6, 0.0]])  # no order at a zero of sin^2
    mu = expected_counts(theta, grid)[0]
    q = grid.q_nm
    interior = (mu[1:-1] > mu[:-2]) & (mu[1:-1] > mu[2:]) & (mu[1:-1] > 1e-9 * mu.max())
    peaks = q[1:-1][interior]
    orders = 2 * math.pi * np.arange(1, 40) / pitch
    orders = orders[(orders > q[0] + 0.005) & (orders < q[-1] - 0.005)]
    assert len(peaks) == len(orders)
    for qn in orders:
        assert np.abs(peaks - qn).min() < 2 * grid.bin_width_nm


def test_torch_and_numpy_agree(rng):
    theta = GratingPrior().sample(16, rng)
    mu_np = expected_counts(theta, GRID)
    mu_torch = expected_counts(torch.as_tensor(theta), GRID)
    assert isinstance(mu_torch, torch.Tensor)
    np.testing.assert_allclose(mu_torch.numpy(), mu_np, rtol=1e-10)
    mu_32 = expected_counts(torch.as_tensor(theta, dtype=torch.float32), GRID)
    np.testing.assert_allclose(mu_32.numpy(), mu_np, rtol=1e-4, atol=1e-4)


def test_orders_fixed_ahead_by_a_largest_pitch_give_the_same_counts(rng):
    """A largest pitch given ahead (a compiled caller's fixed shapes) only adds orders beyond
    the grid's end, which weigh nothing."""
    theta = torch.as_tensor(GratingPrior().sample(16, rng))
    largest = 2.0 * float(theta[:, 0].max())
    ahead = expected_counts(theta, GRID, max_pitch_nm=largest)
    assert torch.equal(ahead, expected_counts(theta, GRID))


def test_prior_respects_its_bounds(rng):
    prior = GratingPrior()
    theta = prior.sample(10_000, rng)
    pitch, width, sigma, photons, background = theta.T
    assert pitch.min() >= 100 and pitch.max() <= 300
    duty = width / pitch
    assert duty.min() >= 0.1 and duty.max() <= 0.9
    assert sigma.min() >= 1 and sigma.max() <= 20
    assert photons.min() >= 1e3 and photons.max() <= 1e6
    assert background.min() >= 0 and background.max() <= 5
    fixed = GratingPrior(fixed_n_photons=1e4, fixed_background=1.0).sample(5, rng)
    assert (fixed[:, 3] == 1e4).all() and (fixed[:, 4] == 1.0).all()


def test_simulated_counts_are_poisson_around_the_expectation(rng):
    theta, counts = simulate(2000, rng)
    assert theta.shape == (2000, len(PARAMETER_NAMES)) and counts.shape == (2000, 512)
    mu = expected_counts(theta, GRID)
    z = (counts.sum(-1) - mu.sum(-1)) / np.sqrt(mu.sum(-1))
    assert abs(z.mean()) < 0.1 and 0.9 < z.std() < 1.1


def _dense_expected_counts(theta: np.ndarray, grid: QGrid) -> np.ndarray:
    """DESIGN.md's formula evaluated literally: every order on every bin."""
    q = grid.q_nm
    mu = np.empty((len(theta), grid.n_points))
    for row, (pitch, width, sigma, photons, background) in enumerate(theta):
        intensity = np.zeros_like(q)
        n = 1
        while (q_n := 2 * math.pi * n / pitch) <= grid.q_max_nm + 6 * grid.resolution_nm:
            form = (pitch / (math.pi * n)) ** 2 * math.sin(math.pi * n * width / pitch) ** 2
            peak = np.exp(-((q - q_n) ** 2) / (2 * grid.resolution_nm**2))
            intensity += form * math.exp(-((q_n * sigma) ** 2)) * peak
            n += 1
        mu[row] = photons * intensity / intensity.sum() + background
    return mu


def test_windowed_peaks_equal_the_literal_formula(rng):
    theta = GratingPrior().sample(200, rng)
    theta[0, :3] = [100.0, 50.0, 1.0]  # first order close to the grid's lower edge
    theta[1, :3] = [300.0, 30.0, 1.0]  # the most orders
    np.testing.assert_allclose(
        expected_counts(theta, GRID), _dense_expected_counts(theta, GRID), rtol=1e-12, atol=1e-12
    )


def test_an_instruments_weights_shape_the_background_and_its_mask_leaves_nan(rng):
    """mu_i = n I_i / sum_j I_j + b g_i, the sum over every bin, masked ones included."""
    instrument = load_instrument(PILATUS)
    theta = instrument.grating_prior.sample(4, rng)
    mu = instrument.expected_counts(theta)
    plain = expected_counts(theta, instrument.grid)  # background 1 per bin
    np.testing.assert_allclose(
        mu - plain, theta[:, 4:5] * (instrument.weights - 1.0), rtol=1e-9, atol=1e-9
    )
    signal = mu - theta[:, 4:5] * instrument.weights
    np.testing.assert_allclose(signal.sum(-1), theta[:, 3], rtol=1e-9)
    mu_torch = instrument.expected_counts(torch.as_tensor(theta))
    np.testing.assert_allclose(mu_torch.numpy(), mu, rtol=1e-9)
    _, counts = instrument.simulate(3, rng)
    assert np.isnan(counts[:, ~instrument.observed]).all()
    assert np.isfinite(counts[:, instrument.observed]).all()
