"""Training and validation as library jobs (pipeline/model/training_run.py,
validation_run.py): what they write and how their reports read, as ``beamline-inn train``
and ``validate`` print them and the flows publish them."""

from pathlib import Path

import pytest

from pipeline.model import Architecture, load
from pipeline.model.train import TrainingConfig
from pipeline.model.training_run import run_training
from pipeline.model.validation_run import ValidationReport

TINY = TrainingConfig(
    steps=4,
    batch_size=16,
    n_validation=32,
    validation_every=2,
    architecture=Architecture(n_blocks=1, hidden=8, condition_dim=4, condition_hidden=8),
)


def test_a_training_writes_its_model_and_reports_it_in_text_and_markdown(tmp_path):
    said: list[str] = []
    out = tmp_path / "tiny.safetensors"
    report = run_training(
        TINY, out, started_by={"flow": "test"}, progress_bar=False, log=said.append
    )
    assert said[0].startswith("training for default: ")
    assert said[0].endswith("on 64 simulations for 4 steps (seed 0)")
    assert report.saved is not None and report.saved.weights == out
    model = load(out, device="cpu")  # the weights' hash is checked against the card
    assert list(model.card["training"])[:2] == ["flow", "step"]
    assert model.card["weights_sha256"] == report.saved.weights_sha256
    lines = report.text().splitlines()
    assert lines[0].startswith("trained in ") and "; validation loss " in lines[0]
    assert lines[1] == f"model written to {out} (card {tmp_path / 'tiny.json'})"
    assert lines[2].startswith("calibration error: pitch_nm=")
    markdown = report.markdown()
    assert markdown.startswith("# Model `tiny.safetensors`")
    assert "| 2 | " in markdown and "| 4 | " in markdown  # the loss at each validation
    assert "Calibration error on 200 fresh simulations" in markdown


def test_stopping_early_needs_a_checkpoint_folder_and_says_how_to_resume(tmp_path):
    with pytest.raises(ValueError, match="--stop-at needs --checkpoint-dir"):
        run_training(TINY, tmp_path / "m.safetensors", started_by={}, stop_at_step=2)
    report = run_training(
        TINY,
        tmp_path / "m.safetensors",
        started_by={},
        checkpoint_dir=tmp_path / "state",
        stop_at_step=2,
        progress_bar=False,
    )
    assert report.saved is None and not (tmp_path / "m.safetensors").exists()
    assert report.text() == (
        f"stopped at step 2 of 4; the state is in {tmp_path / 'state'}: run the same command "
        "without --stop-at to resume"
    )


def _by_name(*values: float) -> dict[str, float]:
    return dict(zip(("pitch_nm", "width_nm", "sigma_nm"), values, strict=True))


def test_a_validation_report_reads_the_same_measures_in_text_and_markdown(tmp_path):
    report = ValidationReport(
        model=Path("m.safetensors"),
        instrument="default",
        report_path=tmp_path / "validation.json",
        figures={"coverage": tmp_path / "coverage.png", "sbc": tmp_path / "sbc.png"},
        diagnostics={
            "simulation": {
                "n_exposures": 200,
                "calibration_error": _by_name(0.0123, 0.02, 0.03),
                "sbc_ks_p": _by_name(0.5, 0.25, 0.000125),
            },
            "reference": {
                "n_exposures": 20,
                "sd_ratio_median": _by_name(1.0, 1.104, 0.9),
                "bias_in_exact_sd_median": _by_name(0.1, 0.2, 0.3),
                "mode_weight_error_max": 0.026,
                "c2st_median": 0.5512,
            },
        },
        updated_card=Path("m.json"),
    )
    assert report.text().splitlines() == [
        f"report: {tmp_path / 'validation.json'}; figures: {tmp_path / 'coverage.png'}, "
        f"{tmp_path / 'sbc.png'}",
        "calibration error:  pitch_nm 0.012  width_nm 0.020  sigma_nm 0.030",
        "SBC KS p:           pitch_nm 0.5  width_nm 0.25  sigma_nm 0.000125",
        "sd ratio (median):  pitch_nm 1.00  width_nm 1.10  sigma_nm 0.90",
        "|bias| / exact sd:  pitch_nm 0.10  width_nm 0.20  sigma_nm 0.30",
        "mode weight error:  max 0.026, C2ST median 0.551",
        "diagnostics written into m.json",
    ]
    markdown = report.markdown()
    assert markdown.startswith("# Validation of `m.safetensors`")
    assert "200 simulated exposures, 20 against the exact posterior" in markdown
    assert "| calibration error | 0.0123 | 0.02 | 0.03 |" in markdown
    assert "C2ST (median): 0.551" in markdown
