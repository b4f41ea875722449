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


def test_hdf5_dataset_with_a_stream_is_refused(tmp_path, capsys):
    from pipeline.integration import DEFAULT_PONI

    args = ["online", "--stream", "tcp://localhost:9999", "--hdf5-dataset", "/data"]
    assert main([*args, "--poni", str(DEFAULT_PONI), "--out", str(tmp_path)]) == 2
    assert "--hdf5-dataset is for the HDF5 files of --watch" in capsys.readouterr().err


def test_a_malformed_poni_stops_reprocess_before_it_starts(tmp_path, capsys):
    (tmp_path / "frame_1.cbf").write_bytes(b"")
    (tmp_path / "bad.poni").write_text("Distance: 0.2\n")
    args = ["reprocess", str(tmp_path / "frame_1.cbf"), "--poni", str(tmp_path / "bad.poni")]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "does not define" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.h5"))


def _failed_rows(path, indices) -> None:
    """A small results file whose rows (exposures ``indices``) all failed."""
    import numpy as np

    from pipeline.store import ExposureResult, ResultsWriter

    names, units, q = ("pitch_nm", "width_nm", "sigma_nm"), ("nm",) * 3, np.linspace(0.1, 1, 512)
    with ResultsWriter(path, names, units, 4, q, scan_id="s") as writer:
        for index in indices:
            writer.append(ExposureResult(index=index, timestamp=0.0, status="failed", error="x"))


def test_show_of_an_exposure_not_in_the_file_says_which_are(tmp_path, capsys):
    path = tmp_path / "scan.h5"
    _failed_rows(path, [0, 1, 2, 5])
    assert main(["show", str(path), "--exposure", "999"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"beamline-inn show: error: exposure 999 is not in {path} (exposures 0-2, 5)\n"
    )
    assert main(["show", str(path), "--exposure", "5"]) == 0


def test_show_of_a_file_from_elsewhere_is_one_line(tmp_path, capsys):
    """An NXcanSAS file written by another program (SasView's layout) is not a results file."""
    import h5py
    import numpy as np

    path = tmp_path / "sasview.h5"
    with h5py.File(path, "w") as handle:
        entry = handle.create_group("entry")
        entry.attrs.update(NX_class="NXentry", canSAS_class="SASentry")
        data = entry.create_group("sasdata")
        data.attrs.update(NX_class="NXdata", canSAS_class="SASdata", signal="I", I_axes="Q")
        data["Q"], data["I"] = np.linspace(0.01, 0.3, 50), np.ones(50)
    assert main(["show", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"beamline-inn show: error: {path} is not a beamline-inn results file "
        "(no entry/posterior): its top level holds entry\n"
    )


def test_an_all_nan_dark_stops_reprocess_before_it_starts(tmp_path, capsys):
    import numpy as np

    from pipeline.integration import DEFAULT_PONI

    np.save(tmp_path / "dark.npy", np.full((4, 4), np.nan, np.float32))
    (tmp_path / "frame_1.cbf").write_bytes(b"")
    args = ["reprocess", str(tmp_path / "frame_1.cbf"), "--poni", str(DEFAULT_PONI)]
    args += ["--dark", str(tmp_path / "dark.npy"), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"the dark image {tmp_path / 'dark.npy'} holds no finite value" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_demo_refuses_an_instrument_that_is_not_the_model_s(prefect_harness, tmp_path, capsys):
    """``--instrument`` with a model trained for another instrument: one line, exit 2, and
    nothing is simulated or written."""
    from importlib.resources import files

    pilatus = files("pipeline") / "data" / "pilatus1m-5m-sector.instrument.json"
    out = tmp_path / "out"
    arguments = ["demo", "--instrument", str(pilatus), "--model", "default", "--out", str(out)]
    assert main(arguments) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("beamline-inn demo: error: the model ")
    assert "for the instrument 'default'" in line and "not for 'pilatus1m-5m-sector'" in line
    assert not out.exists()


def test_scan_options_reach_the_scan_s_configuration(tmp_path):
    from importlib.resources import files

    from flows.cli import build_parser
    from flows.commands.arguments import scan_config

    poni = files("pipeline") / "data" / "eiger4m_5m_8keV.poni"  # the default model's
    paths = [str(tmp_path), "--poni", str(poni), "--out", str(tmp_path)]
    options = ["--sasdata-groups", "first", "--samples-compression", "gzip", "--integrators", "2"]
    options += ["--stored-samples", "0"]
    args = build_parser().parse_args(["reprocess", *paths, *options])
    config = scan_config(args, "s1")
    assert config.store.sasdata_groups == "first" and config.store.samples_compression == "gzip"
    assert config.n_integrators == 2 and config.store.stored_samples == 0
    defaults = scan_config(build_parser().parse_args(["reprocess", *paths]), "s2")
    assert defaults.store.sasdata_groups == "every" and defaults.n_integrators is None
    assert defaults.store.stored_samples is None and not defaults.integrate_on_workers
    assert not defaults.inference.compile
    gpu_mode = build_parser().parse_args(["reprocess", *paths, "--integrate-on-workers"])
    assert scan_config(gpu_mode, "s3").integrate_on_workers
    compiled = build_parser().parse_args(["reprocess", *paths, "--compile"])
    assert scan_config(compiled, "s4").inference.compile
