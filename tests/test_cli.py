import subprocess
import sys

from flows.cli import main
from pipeline.model import load


def test_help_lists_the_commands():
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in result.stdout and "train" in result.stdout


def test_train_writes_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    arguments = ["train", "--steps", "5", "--batch-size", "64", "--blocks", "1", "--hidden", "8"]
    assert main([*arguments, "--out", str(out), "--quiet"]) == 0
    model = load(out, device="cpu")
    assert model.card["training"]["config"]["steps"] == 5
    assert "coverage_90" in model.card["diagnostics"]["calibration"]
    assert "model written to" in capsys.readouterr().out


def test_nonsense_counts_are_refused_before_anything_starts(capsys):
    import pytest

    for arguments in (
        ["demo", "--frames", "0"],
        ["demo", "--workers", "-1"],
        ["train", "--steps", "x"],
    ):
        with pytest.raises(SystemExit) as stop:
            main(arguments)
        assert stop.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
