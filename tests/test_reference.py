"""The exact (staged-grid) posterior: the yardstick every estimator is judged against."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.instrument import load_instrument
from pipeline.physics import expected_counts
from pipeline.physics.reference import (
    mirror_weight,
    nested_sampling_posterior,
    reference_posterior,
)


def _counts(theta, seed=0):
    return (
        np.random.default_rng(seed)
        .poisson(expected_counts(np.asarray(theta)[None])[0])
        .astype(float)
    )


@pytest.fixture(scope="module")
def symmetric_case():
    theta = np.array([200.0, 60.0, 3.0, 1e4, 1.0])
    return theta, reference_posterior(_counts(theta), theta[3], theta[4], n_samples=20_000, seed=1)


def test_both_mirror_modes_are_found_with_equal_weight(symmetric_case):
    theta, posterior = symmetric_case
    assert len(posterior.modes) == 2
    for mode in posterior.modes:
        assert mode.weight == pytest.approx(0.5, abs=0.02)
    widths = sorted(mode.mean[1] for mode in posterior.modes)
    assert widths[0] == pytest.approx(theta[1], abs=2.0)
    assert widths[1] == pytest.approx(theta[0] - theta[1], abs=2.0)
    assert mirror_weight(posterior.samples) == pytest.approx(0.5, abs=0.02)


def test_the_truth_lies_inside_the_posterior(symmetric_case):
    theta, posterior = symmetric_case
    mode = min(posterior.modes, key=lambda m: abs(m.mean[1] - theta[1]))
    z = (mode.mean - theta[:3]) / mode.sd
    assert np.all(np.abs(z) < 4), z
    assert 0.001 < mode.sd[0] < 0.2  # pitch: sharp, as DESIGN.md section 7 says


def test_samples_match_the_mode_moments(symmetric_case):
    _, posterior = symmetric_case
    samples = posterior.samples
    assert samples.shape == (20_000, 3)
    narrow = samples[samples[:, 1] < samples[:, 0] / 2]
    mode = min(posterior.modes, key=lambda m: m.mean[1])
    np.testing.assert_allclose(narrow.mean(0), mode.mean, atol=0.1 * mode.sd.max())
    np.testing.assert_allclose(narrow.std(0), mode.sd, rtol=0.1)


def test_a_half_duty_grating_has_one_mode():
    theta = np.array([150.0, 75.0, 4.0, 1e5, 1.0])
    posterior = reference_posterior(_counts(theta, seed=2), theta[3], theta[4], n_samples=2000)
    assert len(posterior.modes) == 1 and posterior.modes[0].weight == pytest.approx(1.0)
    assert posterior.modes[0].mean[0] == pytest.approx(150.0, abs=0.1)


@pytest.mark.parametrize(
    ("counts", "n_photons", "background", "message"),
    [
        (np.ones(100), 1e4, 1.0, "shape"),
        (np.full(512, np.nan), 1e4, 1.0, "finite"),
        (np.ones(512), 0.0, 1.0, "n_photons"),
    ],
)
def test_bad_input_is_refused(counts, n_photons, background, message):
    with pytest.raises(ValueError, match=message):
        reference_posterior(counts, n_photons, background)


@pytest.mark.slow
def test_nested_sampling_agrees_with_the_reference():
    """dynesty (about 30 s per case here) against the staged grids: weights and moments."""
    pytest.importorskip("dynesty")
    for seed, theta in enumerate(
        [np.array([200.0, 60.0, 3.0, 1e4, 1.0]), np.array([140.0, 100.0, 8.0, 3e4, 2.0])]
    ):
        _assert_nested_sampling_agrees(_counts(theta, seed=seed), theta, seed)


def _assert_nested_sampling_agrees(counts, theta, seed, **options):
    """dynesty's weights and moments equal the staged grids' within its own errors."""
    reference = reference_posterior(counts, theta[3], theta[4], n_samples=20_000, **options)
    nested = nested_sampling_posterior(
        counts, theta[3], theta[4], nlive=1000, n_samples=20_000, seed=seed, **options
    )
    draws = nested.samples
    # a mode's weight from one nested-sampling run is uncertain by about 0.5 * logzerr
    # (each mode holds half the live points): allow three of those
    tolerance = 1.5 * nested.log_evidence_error
    assert mirror_weight(draws) == pytest.approx(mirror_weight(reference.samples), abs=tolerance)
    for mode in reference.modes:
        narrow = mode.mean[1] < mode.mean[0] / 2
        mine = draws[(draws[:, 1] < draws[:, 0] / 2) == narrow]
        assert np.all(np.abs(mine.mean(0) - mode.mean) < 0.5 * mode.sd), (mine.mean(0), mode.mean)
        np.testing.assert_allclose(mine.std(0), mode.sd, rtol=0.15)


PILATUS = Path(__file__).parents[1] / "pipeline" / "data" / "pilatus1m-5m-sector.instrument.json"


def _instrument_case(theta, seed):
    """Counts of the Pilatus sector instrument (a module gap masks bins 184-187, the
    background per bin grows with its pixels), NaN in the masked bins."""
    instrument = load_instrument(PILATUS)
    counts = np.random.default_rng(seed).poisson(instrument.expected_counts(theta[None])[0])
    counts = np.where(instrument.observed, counts, np.nan)
    options = {
        "prior": instrument.grating_prior,
        "grid": instrument.grid,
        "background_weights": instrument.weights,
        "observed": instrument.observed,
    }
    return counts, options


def test_a_masked_weighted_instrument_leaves_its_masked_bins_out():
    # a pitch whose 9th order (q 0.60 1/nm) lies half in the module gap (bins 184-187)
    theta = np.array([94.0, 30.0, 2.0, 3e4, 6.0])
    counts, options = _instrument_case(theta, seed=3)
    posterior = reference_posterior(counts, theta[3], theta[4], n_samples=4000, **options)
    filled = np.nan_to_num(counts, nan=1e6)
    again = reference_posterior(filled, theta[3], theta[4], n_samples=4000, **options)
    np.testing.assert_array_equal(posterior.samples, again.samples)
    assert [round(m.weight, 1) for m in posterior.modes] == [0.5, 0.5]
    narrow = posterior.samples[posterior.samples[:, 1] < posterior.samples[:, 0] / 2]
    assert np.all(np.abs(narrow.mean(0) - theta[:3]) < 4 * narrow.std(0))


@pytest.mark.slow
def test_nested_sampling_agrees_on_a_masked_weighted_instrument():
    """The exact posterior of the Pilatus sector instrument (masked bins out of the
    likelihood, background weighted by pixels per bin) against dynesty."""
    pytest.importorskip("dynesty")
    for seed, theta in enumerate(
        [np.array([94.0, 30.0, 2.0, 3e4, 6.0]), np.array([41.0, 25.0, 1.5, 1e5, 3.0])]
    ):
        counts, options = _instrument_case(theta, seed)
        _assert_nested_sampling_agrees(counts, theta, seed, **options)


def test_the_reference_command_takes_an_instrument(tmp_path, capsys):
    from flows.cli import main

    theta = np.array([94.0, 30.0, 2.0, 3e4, 6.0])
    counts, _ = _instrument_case(theta, seed=3)
    np.save(tmp_path / "line-out.npy", counts[None])
    arguments = [str(tmp_path / "line-out.npy"), "--n-photons", "3e4", "--background", "6"]
    code = main(["reference", *arguments, "--instrument", str(PILATUS), "--samples", "500"])
    assert code == 0 and "2 mode(s)" in capsys.readouterr().out
    assert main(["reference", *arguments]) == 2  # the default instrument has 512 bins
    assert "expected rows of 512 counts" in capsys.readouterr().err
