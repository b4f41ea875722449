import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.instrument import PriorRanges, default_instrument, load_instrument
from pipeline.model import Architecture, ModelFileError, PosteriorModel, load, read_card, save
from pipeline.model.build import build_model
from pipeline.model.cinn import ConditionalINN
from pipeline.model.train import TrainingConfig, train
from pipeline.model.validation import simulation_diagnostics
from pipeline.physics import PARAMETER_NAMES, GratingPrior, simulate

PILATUS = Path(__file__).parents[1] / "pipeline" / "data" / "pilatus1m-5m-sector.instrument.json"

TINY = Architecture(n_blocks=2, hidden=16, condition_dim=8, condition_hidden=32)


@pytest.fixture(scope="module")
def shipped():
    return load(device="cpu")


def test_shipped_model_has_the_public_api(shipped):
    assert shipped.parameter_names[:3] == ("pitch_nm", "width_nm", "sigma_nm")
    _, counts = simulate(3, np.random.default_rng(0))
    samples = shipped.sample(counts, 1000)
    assert samples.shape == (3, 1000, len(shipped.parameter_names))
    assert np.isfinite(samples).all()


def test_shipped_samples_stay_in_the_prior_support(shipped):
    _, counts = simulate(4, np.random.default_rng(1))
    pitch, width, sigma, photons, background = shipped.sample(counts, 500).reshape(-1, 5).T
    assert pitch.min() >= 100 - 1e-3 and pitch.max() <= 300 + 1e-3
    assert (width / pitch).min() >= 0.1 - 1e-4 and (width / pitch).max() <= 0.9 + 1e-4
    assert sigma.min() >= 1 - 1e-4 and sigma.max() <= 20 + 1e-4
    assert photons.min() >= 1e3 * (1 - 1e-4) and photons.max() <= 1e6 * (1 + 1e-4)
    assert background.min() >= -1e-4 and background.max() <= 5 + 1e-4


def test_shipped_model_is_better_than_the_prior_on_pitch(shipped):
    theta, counts = simulate(50, np.random.default_rng(2))
    samples = shipped.sample(counts, 300)
    prior_sd = GratingPrior().sample(100_000, np.random.default_rng(0))[:, 0].std()
    assert np.median(samples[..., 0].std(axis=1)) < 0.5 * prior_sd
    error = np.abs(np.median(samples[..., 0], axis=1) - theta[:, 0])
    assert np.median(error) < 0.25 * prior_sd


def test_shipped_card_matches_its_weights():
    card = read_card()
    assert card["parameter_names"] == list(PARAMETER_NAMES)
    assert card["physics"]["grid"]["n_points"] == 512
    assert card["diagnostics"]["simulation"]["n_exposures"] >= 200
    assert card["diagnostics"]["reference"]["n_exposures"] >= 20


def test_sampling_is_reproducible_with_a_seed(shipped):
    _, counts = simulate(2, np.random.default_rng(3))
    np.testing.assert_array_equal(
        shipped.sample(counts, 50, seed=4), shipped.sample(counts, 50, seed=4)
    )


@pytest.mark.parametrize(
    "counts", [np.zeros((2, 100)), np.zeros(512), np.full((1, 512), np.nan), -np.ones((1, 512))]
)
def test_bad_counts_are_refused(shipped, counts):
    with pytest.raises(ValueError, match="counts"):
        shipped.sample(counts, 10)


@pytest.mark.parametrize(
    ("activation", "conditional_affine"), [("silu", False), ("relu", True), ("relu", False)]
)
def test_flow_is_invertible_and_its_log_det_is_exact(activation, conditional_affine):
    torch.manual_seed(0)
    flow = ConditionalINN(
        dim=5,
        condition_dim=4,
        n_blocks=3,
        hidden=16,
        seed=1,
        activation=activation,
        conditional_affine=conditional_affine,
    ).double()
    for parameter in flow.parameters():  # leave the identity start, so the test means something
        torch.nn.init.normal_(parameter, std=0.3)
    u, c = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    z, log_det = flow(u, c)
    assert (flow.inverse(z, c) - u).abs().max() < 1e-4
    for row in range(3):
        jacobian = torch.autograd.functional.jacobian(
            lambda x, r=row: flow(x[None], c[r : r + 1])[0][0], u[row]
        )
        assert torch.logdet(jacobian).item() == pytest.approx(log_det[row].item(), abs=1e-8)


def test_a_condition_shared_by_many_samples_gives_the_per_row_result():
    torch.manual_seed(0)
    flow = ConditionalINN(5, 4, n_blocks=2, hidden=16, activation="relu", conditional_affine=True)
    for parameter in flow.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    z, c = torch.randn(3, 7, 5), torch.randn(3, 4)
    shared = flow.inverse(z, c[:, None, :])  # sampling: (exposures, samples, 5)
    per_row = flow.inverse(z.reshape(-1, 5), c.repeat_interleave(7, dim=0)).reshape(3, 7, 5)
    torch.testing.assert_close(shared, per_row, rtol=1e-5, atol=1e-5)
    log_q = flow.log_prob(shared, c[:, None, :])
    torch.testing.assert_close(
        log_q.reshape(-1), flow.log_prob(per_row.reshape(-1, 5), c.repeat_interleave(7, dim=0))
    )


@pytest.mark.parametrize(
    ("flow", "centred_nuisances"), [("own", False), ("own", True), ("zuko-realnvp", False)]
)
def test_save_load_round_trip(tmp_path, flow, centred_nuisances):
    model = PosteriorModel(
        dataclasses.replace(TINY, flow=flow, centred_nuisances=centred_nuisances)
    )
    u = torch.randn(7, 5)
    c = torch.randn(7, TINY.condition_dim)
    z, _ = model.flow(u, c)
    assert (model.flow.inverse(z, c) - u).abs().max() < 1e-4
    path = save(model, tmp_path / "tiny", note="test")
    loaded = load(path, device="cpu")
    _, counts = simulate(2, np.random.default_rng(0))
    np.testing.assert_array_equal(
        model.sample(counts, 20, seed=1), loaded.sample(counts, 20, seed=1)
    )
    assert loaded.card["note"] == "test" and loaded.card["architecture"]["flow"] == flow
    assert loaded.transform.centred_nuisances is centred_nuisances


def test_both_width_solutions_get_half_of_the_draws(shipped):
    _, counts = simulate(6, np.random.default_rng(8))
    samples = shipped.sample(counts, 4000, seed=1)
    wide = (samples[..., 1] > 0.5 * samples[..., 0]).mean(axis=1)
    np.testing.assert_allclose(wide, 0.5, atol=0.03)
    # and each exposure's two solutions are mirror images: w and p - w
    narrow = np.where(samples[..., 1] < 0.5 * samples[..., 0], samples[..., 1], np.nan)
    mirrored = np.where(
        samples[..., 1] > 0.5 * samples[..., 0], samples[..., 0] - samples[..., 1], np.nan
    )
    np.testing.assert_allclose(np.nanmedian(narrow, 1), np.nanmedian(mirrored, 1), rtol=0.02)


def test_a_duty_prior_that_is_not_symmetric_is_refused():
    lopsided = default_instrument().model_copy(update={"prior": PriorRanges(duty=(0.1, 0.8))})
    with pytest.raises(ValueError, match="symmetric"):
        PosteriorModel(TINY, lopsided)


def test_masked_bins_are_ignored_whatever_they_hold(tmp_path):
    """A model of an instrument with a module gap: NaN, zeros or huge counts in the masked
    bins give the same draws; the card records the instrument and its hash, and a load
    gives the model back with it."""
    instrument = load_instrument(PILATUS)
    model = PosteriorModel(TINY, instrument).eval()
    _, counts = instrument.simulate(3, np.random.default_rng(0))
    assert np.isnan(counts[:, list(instrument.masked_bins)]).all()
    draws = model.sample(counts, 20, seed=1)
    for fill in (0.0, 1e6):
        filled = counts.copy()
        filled[:, list(instrument.masked_bins)] = fill
        np.testing.assert_array_equal(model.sample(filled, 20, seed=1), draws)
    with pytest.raises(ValueError, match="observed bins"):
        bad = counts.copy()
        bad[0, 0] = np.nan
        model.sample(bad, 20)
    with pytest.raises(ValueError, match="384"):
        model.sample(np.ones((1, 512)), 20)
    path = save(model, tmp_path / "pilatus")
    card = read_card(path)
    assert card["instrument_sha256"] == instrument.sha256()
    loaded = load(path, device="cpu")
    assert loaded.instrument == instrument
    np.testing.assert_array_equal(loaded.sample(counts, 20, seed=1), draws)


def test_bundled_models_are_found_by_name():
    assert load().instrument.name == "default"
    with pytest.raises(ModelFileError, match="bundled models: default, pilatus1m-5m-sector"):
        load("no-such-model")


def test_an_unknown_flow_is_refused():
    with pytest.raises(ValueError, match="unknown flow"):
        PosteriorModel(dataclasses.replace(TINY, flow="glow-9000"))


def test_weights_that_do_not_match_their_card_are_refused(tmp_path, reliability):
    path = save(PosteriorModel(TINY), tmp_path / "tiny")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="SHA-256") as error:
        load(path)
    reliability.record(
        "security",
        "model weights with one byte flipped, beside their model card",
        tried=1,
        detail=f"load refused them: {str(error.value).replace(str(tmp_path), '...')}",
    )


def test_missing_or_foreign_card_is_refused(tmp_path, reliability):
    path = save(PosteriorModel(TINY), tmp_path / "tiny")
    path.with_suffix(".json").write_text(json.dumps({"format": "something else"}))
    refusals = []
    with pytest.raises(ModelFileError) as error:
        load(path)
    refusals.append(error.value)
    path.with_suffix(".json").unlink()
    with pytest.raises(ModelFileError, match="card not found") as error:
        load(path)
    refusals.append(error.value)
    reliability.record(
        "security",
        "model weights with a card of another format, then with no card",
        tried=len(refusals),
        detail="load refused both with ModelFileError: "
        + "; ".join(str(e).replace(str(tmp_path), "...") for e in refusals),
    )


def test_short_training_lowers_the_validation_loss():
    # 5e-4: at the default 1e-3 this tiny model's validation loss spikes around step 125
    # (13.1, 12.3, then 17.1 at step 150 with numpy 2.4), which says nothing of training
    config = TrainingConfig(
        steps=150,
        batch_size=128,
        n_validation=512,
        validation_every=50,
        learning_rate=5e-4,
        architecture=TINY,
    )
    _, history = train(config, progress=False)
    losses = history["validation_loss"]
    assert losses[-1] < losses[0] - 0.5
    untrained = PosteriorModel(TINY)
    theta, counts = simulate(512, np.random.default_rng(config.seed + 99))
    with torch.no_grad():
        before = -untrained.log_prob(
            torch.as_tensor(theta).float(), torch.as_tensor(counts).float()
        ).mean()
    assert losses[-1] < before.item()


def test_a_short_training_beats_the_prior_and_stays_calibrated():
    config = TrainingConfig(
        steps=300, batch_size=256, n_validation=256, validation_every=300, architecture=TINY
    )
    model, _ = train(config, progress=False)
    report, _ = simulation_diagnostics(model, n_exposures=200, n_samples=200, seed=5)
    # the pitch, read off the peak positions, is known far better than the prior says ...
    assert report["contraction"]["pitch_nm"] > 0.99
    # ... and the credible intervals hold the truth about as often as they claim
    assert report["calibration_error"]["pitch_nm"] < 0.1
    assert report["calibration_error"]["n_photons"] < 0.1


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    config = TrainingConfig(
        steps=40,
        batch_size=32,
        n_validation=64,
        validation_every=10,
        checkpoint_every=10,
        architecture=TINY,
        threads=1,
    )
    straight, straight_history = train(config, progress=False)
    _, first_half = train(config, progress=False, checkpoint_dir=tmp_path, stop_at_step=20)
    assert not first_half["completed"] and first_half["step"] == [10, 20]
    resumed, history = train(config, progress=False, checkpoint_dir=tmp_path)
    assert history["completed"] and history["step"] == [10, 20, 30, 40]
    assert history["validation_loss"] == straight_history["validation_loss"]
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    config = TrainingConfig(steps=4, batch_size=16, n_validation=16, architecture=TINY)
    train(config, progress=False, checkpoint_dir=tmp_path, stop_at_step=2)
    with pytest.raises(ValueError, match="another configuration"):
        train(
            dataclasses.replace(config, learning_rate=5e-4), progress=False, checkpoint_dir=tmp_path
        )


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["maximum-likelihood", "bidirectional"])
def test_compiled_sampling_draws_what_eager_sampling_draws(objective):
    """``compile_sampling`` (torch.compile, tens of seconds) changes the speed, not the draws,
    of either kind of model."""
    model = build_model(dataclasses.replace(TINY, objective=objective)).eval()
    network = model.flow if isinstance(model, PosteriorModel) else model.inn
    generator = torch.Generator().manual_seed(3)  # the same network on every run
    for parameter in network.parameters():  # leave the identity start
        with torch.no_grad():
            parameter.normal_(std=0.1, generator=generator)
    _, counts = simulate(3, np.random.default_rng(9))
    eager = model.sample(counts[:2], 300, seed=5)
    model.compile_sampling()
    # as a worker warms up: batch 1, then 2 (recompiled for any size), unseeded; then seeded
    for exposures in (1, 2, 3):
        assert model.sample(counts[:exposures], 300).shape == (exposures, 300, 5)
    compiled = model.sample(counts[:2], 300, seed=5)
    spread = eager.std(axis=1, keepdims=True)  # per exposure and parameter
    # fused kernels reorder float32 sums: draws agree to well under a percent of the spread
    # (a wrong draw would be off by the order of the spread itself)
    assert (np.abs(compiled - eager) / spread).max() < 5e-3


def test_training_for_an_instrument_simulates_it_and_resumes_only_for_it(tmp_path):
    instrument = load_instrument(PILATUS)
    config = TrainingConfig(
        steps=4,
        batch_size=16,
        n_validation=32,
        validation_every=2,
        checkpoint_every=2,
        architecture=TINY,
    )
    model, history = train(
        config, progress=False, checkpoint_dir=tmp_path, stop_at_step=2, instrument=instrument
    )
    assert model.instrument == instrument and model.grid.n_points == 384
    assert history["instrument_sha256"] == instrument.sha256()
    with pytest.raises(ValueError, match="another instrument"):
        train(config, progress=False, checkpoint_dir=tmp_path)
    model, history = train(config, progress=False, checkpoint_dir=tmp_path, instrument=instrument)
    assert history["completed"]
