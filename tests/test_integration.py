from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import IntegrationConfig
from pipeline.instrument import Instrument, load_instrument
from pipeline.integration import FrameError, GeometryError, LineOutIntegrator, load_geometry
from pipeline.physics import PARAMETER_NAMES, GratingPrior, QGrid, expected_counts
from pipeline.sources import SimulatedDetector


@pytest.fixture(scope="module")
def detector():
    return SimulatedDetector(IntegrationConfig(), seed=3)


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
    exposures = list(detector.scan("scan-x", 3).exposures())
    assert [e.index for e in exposures] == [0, 1, 2]
    assert all(set(e.truth) == set(PARAMETER_NAMES) for e in exposures)
    assert exposures[0].frame.shape == load_geometry(None).detector.shape


def test_without_an_instrument_the_frames_are_the_default_instrument_s():
    """The default instrument: DESIGN.md's prior and grid, the same background in every bin
    (the frames are those of before instruments: the first noise-free test above)."""
    exposure = next(iter(SimulatedDetector(IntegrationConfig(), seed=4).scan("d", 1).exposures()))
    theta = GratingPrior().sample(1, np.random.default_rng(4))[0]
    assert list(exposure.truth.values()) == theta.tolist()
    assert exposure.metadata == {"source": "simulated", "detector": "Eiger4M"}


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


#: The Pilatus 1M instrument (bundled with its model): its sector crosses a module gap.
PILATUS = Path(str(files("pipeline") / "data" / "pilatus1m-5m-sector.instrument.json"))


@pytest.fixture(scope="module")
def pilatus(tmp_path_factory) -> tuple[Instrument, IntegrationConfig]:
    """The Pilatus instrument, and the integration of its PONI and sector."""
    instrument = load_instrument(PILATUS)
    poni = tmp_path_factory.mktemp("pilatus") / "pilatus.poni"
    poni.write_text(instrument.poni or "")
    return instrument, IntegrationConfig(poni=poni, azimuth_range_deg=instrument.azimuth_range_deg)


def test_a_simulated_pilatus_has_no_pixel_in_its_masked_bins(pilatus):
    instrument, integration = pilatus
    detector = SimulatedDetector(integration, instrument, seed=1)
    theta = np.array([60.0, 25.0, 2.0, 1e5, 5.0])
    frame = detector.frame(theta, noise=False)
    integrator = LineOutIntegrator(integration, instrument.grid)
    masked = list(instrument.masked_bins)
    assert masked == [184, 185, 186, 187] and (integrator.pixels_per_bin[masked] == 0).all()
    assert (integrator.integrate(frame).counts[masked] == 0).all()  # NaN in the results file
    observed = instrument.observed
    assert frame.sum() == pytest.approx(instrument.expected_counts(theta)[observed].sum())
    exposure = next(iter(detector.scan("pilatus", 1).exposures()))
    assert exposure.frame.shape == (1043, 981) and exposure.metadata["detector"] == "Pilatus1M"
    assert instrument.grating_prior.pitch_nm[0] <= exposure.truth["pitch_nm"]


def test_a_simulated_pilatus_integrates_to_its_instrument_s_expected_counts(pilatus):
    instrument, integration = pilatus
    detector = SimulatedDetector(integration, instrument, seed=2)
    integrator = LineOutIntegrator(integration, instrument.grid)
    observed = instrument.observed
    for theta in instrument.grating_prior.sample(3, np.random.default_rng(6)):
        line_out = integrator.integrate(detector.frame(theta, noise=False))
        mu = instrument.expected_counts(theta)
        np.testing.assert_allclose(line_out.counts[observed], mu[observed], rtol=1e-5)


def test_a_simulated_pilatus_has_the_same_background_per_pixel_in_every_bin(pilatus):
    """With (almost) no signal, each bin holds ``background * g_i``: over the bin's pixels
    (the instrument's count, as its weights were derived), the same in every observed bin."""
    instrument, integration = pilatus
    detector = SimulatedDetector(integration, instrument, seed=3)
    integrator = LineOutIntegrator(integration, instrument.grid)
    frame = detector.frame(np.array([60.0, 25.0, 2.0, 1e-9, 4.0]), noise=False)
    observed = instrument.observed
    pixels = np.array(instrument.pixels_per_bin)[observed]
    per_pixel = integrator.integrate(frame).counts[observed] / pixels
    np.testing.assert_allclose(per_pixel, per_pixel.mean(), rtol=1e-4)
    assert np.unique(frame[frame > 0]).size <= observed.sum()  # one value per bin's pixels
