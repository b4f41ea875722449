import numpy as np
import pytest
import torch

from pipeline.instrument import default_instrument
from pipeline.model.orders import ReadoutGeometry, read_orders
from pipeline.model.posterior import ParameterTransform
from pipeline.physics import GratingPrior, QGrid, expected_counts, simulate

GRID = QGrid()
INSTRUMENT = default_instrument()
READOUT = ReadoutGeometry.of(INSTRUMENT)


@pytest.mark.parametrize("pitch", [104.0, 171.3, 233.0, 296.5])
@pytest.mark.parametrize("start_offset", [-3.5, 0.0, 3.5])
def test_pitch_is_recovered_from_a_start_a_few_nm_off(pitch, start_offset):
    theta = np.array([[pitch, 0.37 * pitch, 4.0, 1e5, 1.0]])
    counts = torch.tensor(expected_counts(theta, GRID)).float()
    read = read_orders(counts, torch.tensor([pitch + start_offset]), INSTRUMENT)
    assert read.pitch_nm[0].item() == pytest.approx(pitch, abs=0.01)
    assert 0 < read.pitch_error_nm[0].item() < 0.05
    assert read.features.shape == (1, READOUT.n_features)


def test_refined_pitch_errors_match_the_noise():
    theta, counts = simulate(400, np.random.default_rng(11))
    start = theta[:, 0] + np.random.default_rng(12).normal(0.0, 1.5, len(theta))
    read = read_orders(torch.tensor(counts).float(), torch.tensor(start).float(), INSTRUMENT)
    error = np.abs(read.pitch_nm.numpy() - theta[:, 0])
    bright = theta[:, 3] > 1e5
    assert np.median(error) < 0.05 and np.median(error[bright]) < 0.015
    assert np.quantile(error, 0.9) < 0.5  # the fit does not jump to a neighbouring comb


def test_a_line_out_without_peaks_keeps_the_guess_with_a_wide_error():
    counts = torch.full((1, GRID.n_points), 3.0)
    read = read_orders(counts, torch.tensor([180.0]), INSTRUMENT)
    assert read.pitch_nm.item() == 180.0
    assert read.pitch_error_nm.item() == READOUT.max_pitch_error_nm
    assert torch.isfinite(read.features).all()


@pytest.mark.parametrize("centred_nuisances", [False, True])
def test_centred_coordinates_round_trip_on_both_width_solutions(centred_nuisances):
    transform = ParameterTransform(GratingPrior(), centred_nuisances)
    theta, counts = simulate(64, np.random.default_rng(0))
    theta = torch.tensor(theta).float()
    read = read_orders(torch.tensor(counts).float(), theta[:, 0] + 1.0, INSTRUMENT)
    mirrored = theta.clone()
    mirrored[:, 1] = theta[:, 0] - theta[:, 1]  # the other solution of the phase problem
    u = transform.to_network(theta, read)
    assert torch.isfinite(u).all()
    # both solutions share one (folded) coordinate; the side picks one of them
    torch.testing.assert_close(transform.to_network(mirrored, read), u, rtol=1e-3, atol=1e-3)
    side = torch.sign(theta[:, 1] / theta[:, 0] - 0.5)
    torch.testing.assert_close(transform.to_physical(u, read, side), theta, rtol=2e-4, atol=2e-3)
    torch.testing.assert_close(
        transform.to_physical(u, read, -side), mirrored, rtol=2e-4, atol=2e-3
    )


def test_nuisances_are_read_off_the_background_between_orders():
    theta, counts = simulate(2000, np.random.default_rng(5))
    read = read_orders(torch.tensor(counts).float(), torch.tensor(theta[:, 0]).float(), INSTRUMENT)
    for truth, estimate, error in (
        (np.log10(theta[:, 3]), read.log10_n_photons, read.log10_n_photons_error),
        (theta[:, 4], read.background, read.background_error),
    ):
        z = (truth - estimate.numpy()) / error.numpy()
        assert abs(np.median(z)) < 0.1  # unbiased
        assert 0.6 < np.std(z) < 1.2  # with errors of the right size
    # with centred nuisances the network sees these pulls, not positions in a prior range
    u = ParameterTransform(GratingPrior(), centred_nuisances=True).to_network(
        torch.tensor(theta).float(), read
    )
    spread = u[:, 3:].std(0)
    assert (spread > 0.6).all() and (spread < 1.2).all()


def test_duty_and_roughness_are_read_off_the_order_intensities():
    theta, counts = simulate(400, np.random.default_rng(21))
    read = read_orders(torch.tensor(counts).float(), torch.tensor(theta[:, 0]).float(), INSTRUMENT)
    duty = theta[:, 1] / theta[:, 0]
    narrow = np.minimum(duty, 1.0 - duty)
    assert np.median(np.abs(read.duty.numpy() - narrow)) < 0.005
    log_error = np.abs(np.log(read.sigma_nm.numpy() / theta[:, 2]))
    assert np.median(log_error) < 0.1
    assert (read.duty.numpy() <= 0.5).all()


@pytest.mark.slow
def test_a_compiled_sampler_of_a_masked_instrument_compiles_nothing_more_for_new_data():
    """The share of the photons in a masked instrument's masked bins sums a number of orders
    fixed ahead, not one read from each batch: the Pilatus 1M model's compiled sampler once
    compiled again for every batch (0.9-3.9 s each instead of 0.01 s)."""
    from torch._dynamo.utils import counters

    from pipeline.model import load

    model = load("pilatus1m-5m-sector", device="cpu")
    model.compile_sampling()
    for exposures in (1, 2):  # as a worker does before it serves
        model.sample(np.ones((exposures, model.grid.n_points)), 200)
    graphs = counters["stats"]["unique_graphs"]
    rng = np.random.default_rng(5)
    for _ in range(4):
        _, counts = simulate(3, rng, model.prior, model.grid, model.instrument.weights)
        assert np.isfinite(model.sample(np.nan_to_num(counts), 200)).all()
    assert counters["stats"]["unique_graphs"] == graphs
