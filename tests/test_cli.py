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
    assert "calibration_error" in model.card["diagnostics"]["simulation"]
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
    assert main(["train", "--stop-at", "10"]) == 2
    assert "--stop-at needs --checkpoint-dir" in capsys.readouterr().err


def test_reference_reads_a_text_file_and_writes_modes(tmp_path, capsys):
    import json

    import numpy as np

    from pipeline.physics import expected_counts

    theta = np.array([[180.0, 50.0, 4.0, 2e4, 1.0]])
    counts = np.random.default_rng(0).poisson(expected_counts(theta)[0])
    np.savetxt(tmp_path / "line.txt", counts[None])
    out = tmp_path / "ref" / "line"
    arguments = ["reference", str(tmp_path / "line.txt"), "--n-photons", "2e4", "--background", "1"]
    assert main([*arguments, "--samples", "500", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert [round(m["weight"], 2) for m in report[0]["modes"]] == [0.5, 0.5]
    assert np.load(out.with_suffix(".npz"))["line.txt[0]"].shape == (500, 3)
    assert "weight 0.500" in capsys.readouterr().out


def test_reference_without_nuisances_says_what_is_missing(tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "line.npy", np.ones(512))
    assert main(["reference", str(tmp_path / "line.npy")]) == 2
    assert "give --n-photons and --background" in capsys.readouterr().err
    assert (
        main(["reference", str(tmp_path / "missing.npy"), "--n-photons", "1", "--background", "0"])
        == 2
    )
    assert "no such file" in capsys.readouterr().err


def test_reprocess_of_nothing_says_which_pattern_matched_nothing(tmp_path, capsys):
    from pipeline.integration import DEFAULT_PONI

    pattern = str(tmp_path / "scan_*.cbf")
    args = ["reprocess", pattern, "--poni", str(DEFAULT_PONI), "--out", str(tmp_path)]
    assert main(args) == 2
    assert f"no file matches {pattern}" in capsys.readouterr().err


def test_a_malformed_poni_stops_reprocess_before_it_starts(tmp_path, capsys):
    (tmp_path / "frame_1.cbf").write_bytes(b"")
    (tmp_path / "bad.poni").write_text("Distance: 0.2\n")
    args = ["reprocess", str(tmp_path / "frame_1.cbf"), "--poni", str(tmp_path / "bad.poni")]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "does not define" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.h5"))
