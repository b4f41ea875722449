"""A geometry that does not match the model's instrument is refused before the scan starts
(issue 21, item 6): one line naming the q range the geometry reaches and the one the model
needs, exit code 2, no frame read, no process started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from pipeline.config import GridConfig, InferenceConfig, IntegrationConfig, ScanSettings
from pipeline.exposure import Exposure
from pipeline.instrument import default_instrument, load_instrument
from pipeline.integration import DEFAULT_PONI, LineOutIntegrator, load_geometry, sector_pixel_bins
from pipeline.preflight import (
    GeometryMismatch,
    SetupError,
    check_geometry,
    check_settings,
    settings_for_model,
)

PILATUS = Path(__file__).parents[1] / "pipeline" / "data" / "pilatus1m-5m-sector.instrument.json"
ADVICE = "train a model for this geometry (beamline-inn instrument, then beamline-inn train"


@pytest.fixture(scope="module")
def pilatus(tmp_path_factory) -> tuple[Path, Path]:
    """The bundled Pilatus instrument's PONI in a file, and a tiny untrained model for that
    instrument (its weights are trained elsewhere)."""
    from pipeline.model import Architecture, PosteriorModel, save

    instrument = load_instrument(PILATUS)
    folder = tmp_path_factory.mktemp("pilatus")
    poni = folder / "pilatus1m_5m.poni"
    poni.write_text(instrument.poni)
    architecture = Architecture(n_blocks=1, hidden=8, condition_dim=4, condition_hidden=8)
    model = save(PosteriorModel(architecture, instrument), folder / "pilatus.safetensors")
    return poni, model


def _scan_files(folder: Path) -> list[str]:
    """What a scan that started would leave in its output folder."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_a_scan_on_a_geometry_the_model_was_not_trained_for_stops_at_once(
    tmp_path, pilatus, reliability
):
    """``beamline-inn reprocess`` of the Pilatus geometry with the default model: one line,
    exit code 2, before any frame is read (the frames here are not even frames) or any
    process, run folder or results file is made."""
    poni, _ = pilatus
    frames = tmp_path / "frames"
    frames.mkdir()
    for number in (1, 2, 3):
        (frames / f"frame_{number}.cbf").write_bytes(b"never read: the scan does not start")
    out = tmp_path / "out"
    scratch_before = set(Path(tempfile.gettempdir()).glob("binn-*"))
    command = [sys.executable, "-m", "flows.cli", "reprocess", str(frames / "frame_*.cbf")]
    command += ["--poni", str(poni), "--out", str(out), "--workers", "1"]
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    wall_s = time.monotonic() - started
    reliability.record(
        "bad input",
        "setup error: a geometry (the Pilatus instrument's PONI) that the default model was "
        "not trained for",
        tried=1,
        detail=f"exit {result.returncode} in {wall_s:.1f} s (the whole command, imports "
        f"included): {result.stderr.strip()[:160]}",
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(
        "beamline-inn reprocess: error: the geometry reaches q 0-1.67 1/nm in the sector "
        "-5..5 deg, but in 512 of the 512 q bins the model 'default' observes (q 0.01-0.4 "
        "1/nm) the pixels are not where its instrument has them (worst: q 0.01 1/nm: no pixel "
        f"here, {default_instrument().pixels_per_bin[0]} in the model's): " + ADVICE
    ), result.stderr
    assert _scan_files(out) == []  # no results file, no logs folder: no process started
    assert set(Path(tempfile.gettempdir()).glob("binn-*")) <= scratch_before  # no run folder
    assert wall_s < 30, f"refused after {wall_s:.1f} s"  # about 4 s on 2 busy cores


def test_the_real_ceo2_frame_is_refused_for_the_default_model(shared_data, tmp_path, capsys):
    """A wide-angle CeO2 frame (Pilatus 1M, v1 PONI without a detector: the shape from the
    TIFF's header) never reaches the model: the geometry's q range is said, not "the frame is
    saturated" for the 2 pixels the sector has in the model's q range."""
    frame, poni = shared_data / "CeO2_Pilatus1M.tif", shared_data / "CeO2_Pilatus1M.poni"
    out = tmp_path / "out"
    args = ["reprocess", str(frame), "--poni", str(poni), "--out", str(out)]
    for extra, where in (
        ([], "q 0.158-59.1 1/nm in the sector -5..5 deg"),
        (["--full-ring"], "q 0.0313-82.1 1/nm on the full ring"),
    ):
        assert main([*args, *extra]) == 2
        error = capsys.readouterr().err
        assert error == (
            f"beamline-inn reprocess: error: the geometry reaches {where}; the model 'default' "
            f"needs q 0.01-0.4 1/nm: {ADVICE} --instrument) or give the model trained for it "
            "(--model)\n"
        )
        assert _scan_files(out) == []


def test_a_matching_geometry_passes(tmp_path, pilatus):
    """The default settings pass for the default model; the Pilatus geometry with the
    sector -5 5 passes against its own instrument, and its model's instrument sets the
    scan's grid."""
    check_settings(settings_for_model(ScanSettings(output_dir=tmp_path / "out")))
    poni, model = pilatus
    instrument = load_instrument(PILATUS)
    integration = IntegrationConfig(poni=poni, azimuth_range_deg=(-5.0, 5.0))
    check_geometry(LineOutIntegrator(integration, instrument.grid), instrument, instrument.name)
    settings = settings_for_model(
        ScanSettings(
            output_dir=tmp_path / "out",
            integration=integration,
            inference=InferenceConfig(model=model),
        )
    )
    assert settings.grid == GridConfig(
        q_min_nm=0.05, q_max_nm=1.2, n_points=384, resolution_nm=3e-3
    )
    check_settings(settings)


def test_the_pilatus_geometry_is_refused_for_the_default_model_and_another_sector_too(
    tmp_path, pilatus
):
    poni, model = pilatus
    settings = ScanSettings(output_dir=tmp_path, integration=IntegrationConfig(poni=poni))
    with pytest.raises(GeometryMismatch, match="the model 'default' observes") as refused:
        check_settings(settings_for_model(settings))
    assert ADVICE in str(refused.value) and "\n" not in str(refused.value)
    ring = IntegrationConfig(poni=poni, azimuth_range_deg=None)
    mine = settings_for_model(
        settings.model_copy(update={"inference": InferenceConfig(model=model)})
    )
    with pytest.raises(GeometryMismatch) as refused:
        check_settings(mine.model_copy(update={"integration": ring}))
    message = str(refused.value)
    assert message.startswith("the geometry reaches q 0-2.3 1/nm on the full ring, but ")
    assert "the model 'pilatus1m-5m-sector' observes (q 0.05-1.2 1/nm)" in message
    assert (
        "where its instrument has them, in the sector -5..5 deg (worst: the bins up to" in message
    )


def test_a_mask_of_hot_pixels_passes_and_a_cluster_does_not(tmp_path):
    """Hot pixels take one pixel each: ten isolated ones (the first and last bins, which
    hold 9 and 149, among them) and a hundred more scattered over the sector pass; a 30 x 30
    cluster in the sector takes whole rows of pixels from the bins it crosses: another
    instrument."""
    integration = IntegrationConfig()
    bins = sector_pixel_bins(load_geometry(None), default_instrument().grid, integration)
    mask = np.zeros(bins.shape, np.uint8)
    for target in (0, 3, 60, 130, 200, 270, 340, 410, 480, 511):  # one pixel in each
        row, column = np.argwhere(bins == target)[0]
        mask[row, column] = 1
    in_sector = np.flatnonzero(bins.ravel() >= 0)
    mask.flat[np.random.default_rng(0).choice(in_sector, 100, replace=False)] = 1
    np.save(tmp_path / "hot.npy", mask)
    hot = ScanSettings(
        output_dir=tmp_path / "out", integration=IntegrationConfig(mask=tmp_path / "hot.npy")
    )
    check_settings(settings_for_model(hot))

    row, column = np.argwhere(bins == 300)[0]
    mask[row - 15 : row + 15, column - 15 : column + 15] = 1
    np.save(tmp_path / "cluster.npy", mask)
    cluster = hot.model_copy(
        update={"integration": IntegrationConfig(mask=tmp_path / "cluster.npy")}
    )
    with pytest.raises(GeometryMismatch) as refused:
        check_settings(settings_for_model(cluster))
    message = str(refused.value)
    assert message.startswith("the geometry reaches q 0-1.23 1/nm in the sector -5..5 deg, but ")
    assert "the model 'default' observes (q 0.01-0.4 1/nm) the pixels are not where" in message


def test_a_recalibrated_geometry_passes(tmp_path):
    """Edges that move by less than a bin move whole rows of pixels between neighbouring bins
    (2 mm of distance, half a pixel of beam centre): still the model's instrument. A
    geometry 1% farther away, or a sector 10% wider, is not."""
    text = DEFAULT_PONI.read_text()
    assert "Distance: 5.0\n" in text and "Poni2: 0.0045375\n" in text
    for name, new in (
        ("closer", text.replace("Distance: 5.0\n", "Distance: 4.998\n")),
        ("centre", text.replace("Poni2: 0.0045375\n", "Poni2: 0.00457500\n")),
        ("farther", text.replace("Distance: 5.0\n", "Distance: 5.05\n")),
    ):
        poni = tmp_path / f"{name}.poni"
        poni.write_text(new)
        settings = ScanSettings(
            output_dir=tmp_path / "out", integration=IntegrationConfig(poni=poni)
        )
        if name == "farther":
            with pytest.raises(GeometryMismatch, match="the pixels are not where"):
                check_settings(settings_for_model(settings))
        else:
            check_settings(settings_for_model(settings))
    wider = ScanSettings(
        output_dir=tmp_path / "out", integration=IntegrationConfig(azimuth_range_deg=(-5.5, 5.5))
    )
    with pytest.raises(GeometryMismatch, match=r"has them, in the sector -5\.\.5 deg"):
        check_settings(settings_for_model(wider))


@pytest.mark.parametrize("command", ["demo", "reprocess", "reprocess-scans", "online"])
def test_a_model_that_is_neither_a_file_nor_a_bundled_one_is_one_line(tmp_path, capsys, command):
    where = ["--poni", str(DEFAULT_PONI), "--out", str(tmp_path / "out")]
    args = {
        "demo": ["demo", "--out", str(tmp_path / "out")],
        "reprocess": ["reprocess", str(tmp_path / "*.cbf"), *where],
        "reprocess-scans": ["reprocess-scans", str(tmp_path / "scan_*"), *where],
        "online": ["online", "--watch", str(tmp_path), *where],
    }[command]
    assert main([*args, "--model", "no-such-model"]) == 2
    assert capsys.readouterr().err == (
        f"beamline-inn {command}: error: model file not found: no-such-model (bundled models: "
        "default, pilatus1m-5m-sector)\n"
    )


def test_a_grid_set_in_the_settings_must_be_the_models():
    settings_for_model(ScanSettings(grid=GridConfig()))  # the default model's: fine
    with pytest.raises(SetupError, match="leave the grid out of the settings"):
        settings_for_model(ScanSettings(grid=GridConfig(q_max_nm=0.5)))


def _exposure(index: int, frame: np.ndarray) -> Exposure:
    return Exposure("first", index, time.time(), frame, metadata={"source": f"frame {index}"})


def test_a_geometry_whose_shape_comes_with_the_first_frame_is_checked_then(
    tmp_path, small_detector
):
    """A PONI without a detector (``online`` with a v1 PONI): the pixels per bin are known
    once the first frame made the integrator; the scan stops there, in one line, before any
    line-out reaches the default model."""
    from workers.feeder import Feeder, ScanError

    config = _small_detector_scan(tmp_path, small_detector, model=None)
    frame = np.random.default_rng(1).poisson(20.0, (48, 64)).astype(np.uint32)
    with pytest.raises(ScanError) as stopped, Feeder(config) as feeder:
        feeder.submit(_exposure(0, frame))
    assert str(stopped.value) == (
        "the geometry reaches q 0.0107-0.597 1/nm on the full ring; the model 'default' needs "
        f"q 0.01-0.4 1/nm: {ADVICE} --instrument) or give the model trained for it (--model)"
    )
    assert feeder.n_done == 0 and feeder.in_flight == 0


def test_a_saturated_frame_on_a_matching_geometry_is_still_said_to_be_saturated(
    tmp_path, small_detector
):
    """The first frame completes the geometry, which matches the small detector's model;
    that frame is saturated, and says so; the next one is reconstructed."""
    from pipeline.store import open_results
    from workers.feeder import Feeder

    config = _small_detector_scan(tmp_path, small_detector, model=small_detector.model)
    saturated = np.full((48, 64), np.iinfo(np.uint32).max, np.uint32)
    frame = np.random.default_rng(2).poisson(20.0, (48, 64)).astype(np.uint32)
    with Feeder(config) as feeder:
        feeder.submit(_exposure(0, saturated))
        feeder.submit(_exposure(1, frame))
        summary = feeder.wait()
    assert summary.written_ok == 1 and summary.failed == 1, summary.failures
    assert "the frame is saturated" in summary.failures[0]
    results = open_results(config.output_path)
    assert results.status.tolist() == ["failed", "ok"]
    assert json.loads(results.config_json)["grid"]["n_points"] == 64  # the model's grid


def _small_detector_scan(tmp_path, small_detector, model):
    """The configuration of a one-worker scan of the small detector's full ring (whose
    shape only the first frame gives) with ``model`` (``None``: the default one)."""
    from pipeline.config import PipelineConfig

    return settings_for_model(
        PipelineConfig(
            scan_id="first",
            n_workers=1,
            output_dir=tmp_path,
            integration=IntegrationConfig(poni=small_detector.poni, azimuth_range_deg=None),
            inference=InferenceConfig(n_samples=20, model=model),
        )
    )
