import numpy as np
import pytest

from pipeline.config import IntegrationConfig
from pipeline.integration import FrameError, GeometryError, LineOutIntegrator, load_geometry
from pipeline.physics import PARAMETER_NAMES, GratingPrior, QGrid, expected_counts
from pipeline.sources import SimulatedDetector


@pytest.fixture(scope="module")
def detector():
    return SimulatedDetector(IntegrationConfig(), QGrid(), seed=3)


@pytest.fixture(scope="module")
def integrator():
    return LineOutIntegrator(IntegrationConfig(), QGrid())


def test_noise_free_frame_integrates_to_the_expected_counts(detector, integrator):
    for theta in GratingPrior().sample(3, np.random.default_rng(5)):
        mu = expected_counts(theta[None])[0]
        line_out = integrator.integrate(detector.frame(theta, noise=False))
        np.testing.assert_allclose(line_out.q_nm, QGrid().q_nm)
        well_filled = mu > 10
        relative = np.abs(line_out.counts - mu)[well_filled] / mu[well_filled]
        assert relative.max() < 0.01


def test_noisy_frame_is_poisson_per_bin(detector, integrator):
    theta = np.array([180.0, 50.0, 4.0, 1e5, 2.0])
    mu = expected_counts(theta[None])[0]
    residuals = [
        (integrator.integrate(detector.frame(theta)).counts - mu) / np.sqrt(mu) for _ in range(20)
    ]
    z = np.concatenate(residuals)
    assert abs(z.mean()) < 0.05 and 0.95 < z.std() < 1.05


def test_poisson_error_is_the_square_root_of_the_counts_floored_at_one(detector, integrator):
    line_out = integrator.integrate(detector.frame(np.array([150.0, 40.0, 3.0, 1e4, 1.0])))
    np.testing.assert_allclose(line_out.counts_sd, np.sqrt(np.maximum(line_out.counts, 1)))
    assert (line_out.counts == 0).any()  # the floor is exercised


def test_exposures_carry_their_truth(detector):
    exposures = list(detector.exposures("scan-x", 3))
    assert [e.index for e in exposures] == [0, 1, 2]
    assert all(set(e.truth) == set(PARAMETER_NAMES) for e in exposures)
    assert exposures[0].frame.shape == load_geometry(None).detector.shape


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((10, 10), np.uint32), "shape"),
        (np.zeros(5, np.uint32), "shape"),
        (np.full((2167, 2070), np.nan), "NaN"),
        (np.full((2167, 2070), np.inf, dtype=np.float32), "NaN or infinite"),
        (np.zeros((2167, 2070), dtype=bool), "dtype"),
    ],
)
def test_bad_frames_raise_a_specific_error(integrator, frame, message):
    with pytest.raises(FrameError, match=message):
        integrator.integrate(frame)


def test_missing_poni_is_a_clear_error(tmp_path):
    with pytest.raises(GeometryError, match="PONI"):
        LineOutIntegrator(IntegrationConfig(poni=tmp_path / "nope.poni"), QGrid())


def test_a_sector_too_narrow_for_the_grid_is_refused():
    with pytest.raises(ValueError, match="no pixel"):
        SimulatedDetector(IntegrationConfig(azimuth_range_deg=(170.0, 180.0)))
