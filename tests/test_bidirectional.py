import numpy as np
import pytest
import torch

from pipeline.model import Architecture, load, save
from pipeline.model.bidirectional import (
    BidirectionalINN,
    line_out_features,
    mmd_inverse_multiquadratic,
    reverse_ramp,
)
from pipeline.model.build import build_model
from pipeline.model.train import TrainingConfig, train
from pipeline.physics import simulate

TINY = Architecture(objective="bidirectional", n_blocks=2, hidden=32)


def test_the_inn_maps_padded_parameters_to_features_and_latent_and_back():
    torch.manual_seed(0)
    inn = BidirectionalINN(TINY).eval()
    for parameter in inn.inn.parameters():  # leave the identity start
        torch.nn.init.normal_(parameter, std=0.2)
    x = torch.randn(16, 5)
    out = inn(x)
    assert out.shape == (16, inn.dim_y + inn.dim_z) == (16, 65 + 5)
    back = inn.inverse(out[:, : inn.dim_y], out[:, inn.dim_y :])
    assert (back[:, :5] - x).abs().max() < 1e-4
    assert back[:, 5:].abs().max() < 1e-4  # the zero padding comes back as zeros


def test_line_out_features_pool_the_counts():
    counts = torch.arange(512, dtype=torch.float32).repeat(2, 1)
    features = line_out_features(counts)
    assert features.shape == (2, 65)
    assert torch.isclose(features[0, 0], (torch.log1p(torch.tensor(3.5)) - 2.0) / 2.0)


def test_mmd_is_zero_for_one_sample_and_grows_with_a_shift():
    a = torch.randn(256, 3, generator=torch.Generator().manual_seed(1))
    b = torch.randn(256, 3, generator=torch.Generator().manual_seed(2))
    assert mmd_inverse_multiquadratic(a, a).item() == pytest.approx(0.0, abs=1e-6)
    same = mmd_inverse_multiquadratic(a, b).item()
    shifted = mmd_inverse_multiquadratic(a, b + 1.0).item()
    assert shifted > 10 * same


def test_the_reverse_loss_is_ramped_up():
    assert reverse_ramp(0.0) == pytest.approx(0.004)
    assert reverse_ramp(0.5) < 0.1 and reverse_ramp(1.0) == 1.0


def test_bidirectional_training_lowers_its_loss_and_round_trips(tmp_path):
    config = TrainingConfig(
        steps=120, batch_size=128, n_validation=256, validation_every=40, architecture=TINY
    )
    model, history = train(config, progress=False)
    assert isinstance(model, BidirectionalINN)
    losses = history["validation_loss"]
    assert losses[-1] < losses[0]
    path = save(model, tmp_path / "bidirectional")
    loaded = load(path, device="cpu")
    assert isinstance(loaded, BidirectionalINN)
    _, counts = simulate(2, np.random.default_rng(0))
    np.testing.assert_array_equal(model.sample(counts, 8, seed=3), loaded.sample(counts, 8, seed=3))


def test_an_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="unknown objective"):
        build_model(Architecture(objective="adversarial"))
