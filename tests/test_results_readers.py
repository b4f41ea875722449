"""The results file in the tools analysts use, on a demo's file (of the default instrument,
and of the Pilatus 1M whose sector crosses a module gap: bins that hold NaN, masked): the NeXus
validator (pynxtools' ``pynx validate``), silx, nexusformat (NeXpy's library) and SasView's
reader (sasdata); and viewers that hold or poll the file while a demo writes it."""

import contextlib
import io
import json
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import pytest
from conftest import nexus_validation_problems

from flows.cli import main
from pipeline.instrument import Instrument, default_instrument, load_instrument
from pipeline.model import Architecture, PosteriorModel, save
from pipeline.store import open_results, read_completion

FRAMES = 6
#: The Pilatus 1M instrument (bundled with its model): bins 184-187 lie in a module gap.
PILATUS = Path(str(files("pipeline") / "data" / "pilatus1m-5m-sector.instrument.json"))


class Demo(NamedTuple):
    """A demo's results file, what it printed, and the instrument it simulated."""

    path: Path
    printed: str
    instrument: Instrument


@pytest.fixture(scope="module", params=["default", "pilatus1m-5m-sector"])
def demo(request, prefect_harness, tmp_path_factory) -> Demo:
    """A demo of the default model, or of the Pilatus instrument (``--instrument``) with a
    tiny untrained model made for it."""
    out = tmp_path_factory.mktemp("demo")
    arguments = ["demo", "--frames", str(FRAMES), "--workers", "1", "--out", str(out)]
    instrument = default_instrument()
    if request.param != "default":
        instrument = load_instrument(PILATUS)
        architecture = Architecture(n_blocks=1, hidden=8, condition_dim=4, condition_hidden=8)
        model = tmp_path_factory.mktemp("model") / "tiny.safetensors"
        save(PosteriorModel(architecture, instrument), model)
        arguments += ["--instrument", str(PILATUS), "--model", str(model)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(arguments) == 0
    (path,) = out.glob("*.h5")
    return Demo(path, printed.getvalue(), instrument)


@pytest.fixture(scope="module")
def demo_file(demo: Demo) -> Path:
    return demo.path


def _intensities(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each exposure's I and Idev (counts and their sd over the normalization), and q."""
    results = open_results(path)
    with h5py.File(path) as handle:
        counts_sd = handle["entry/line_out/counts_sd"][()][
            np.argsort(handle["entry/exposures/index"][()])
        ]
    scale = 1 / results.normalization[:, None]
    return results.counts * scale, counts_sd * scale, results.q_nm


def test_the_nexus_validator_finds_a_valid_nxcansas_file(demo_file):
    assert nexus_validation_problems(demo_file) == []


def test_masked_bins_hold_nan_beside_the_mask_and_the_file_holds_the_instrument(demo):
    """The instrument's masked bins (none for the default) are NaN in every stored line-out
    and True in I_mask; the instrument is in the file; the scan used its PONI, sector, grid
    and prior (the default demo as before: the bundled PONI, named by no file)."""
    results = open_results(demo.path)
    completion = read_completion(demo.path)
    assert completion is not None and completion.n_exposures == FRAMES
    assert results.instrument == demo.instrument
    masked = ~demo.instrument.observed
    with h5py.File(demo.path) as handle:
        line_out = handle["entry/line_out"]
        assert line_out["I_mask"][()].tolist() == masked.tolist()
        for name in ("counts", "counts_sd", "I", "Idev"):
            values = line_out[name][()]
            assert np.isnan(values[:, masked]).all() and np.isfinite(values[:, ~masked]).all()
        assert handle["entry/sasdata_000000/I_mask"][()].tolist() == masked.tolist()
        stored = handle["entry/instrument/geometry/beamline_inn_instrument"]
        assert stored.attrs["sha256"] == demo.instrument.sha256()
    config = json.loads(results.config_json)
    assert config["grid"]["n_points"] == demo.instrument.n_points
    assert tuple(config["integration"]["azimuth_range_deg"]) == demo.instrument.azimuth_range_deg
    poni = config["integration"]["poni"]
    if demo.instrument == default_instrument():
        assert poni is None
    else:
        assert Path(poni).read_text() == demo.instrument.poni
    low, high = demo.instrument.prior.pitch_nm
    assert ((low <= results.truth[:, 0]) & (results.truth[:, 0] <= high)).all()


def test_a_demo_prints_its_instrument_and_the_posterior_against_the_truth(demo):
    assert f"exposures:  {FRAMES} ({FRAMES} written, 0 failed)" in demo.printed
    named = f"instrument: {demo.instrument.describe()}" in demo.printed
    assert named == (demo.instrument != default_instrument())
    table = demo.printed.split("against the truth")[1].splitlines()[1:]
    assert table[0].split() == ["exposure", "pitch_nm", "width_nm", "sigma_nm"]
    assert [line.split()[0] for line in table[1:]] == [str(i) for i in range(5)]


def test_silx_finds_each_exposure_s_curve_with_its_q_axis_and_errors(demo_file):
    from silx.io.nxdata import NXdata, get_default

    intensity, intensity_sd, q_nm = _intensities(demo_file)
    with h5py.File(demo_file) as handle:
        default = get_default(handle)
        assert default is not None and default.group.name == "/entry/sasdata_000000"
        for index in range(FRAMES):
            curve = NXdata(handle[f"entry/sasdata_{index:06d}"])
            assert curve.is_valid, curve.issues
            assert curve.axes_dataset_names == ["Q"]
            np.testing.assert_allclose(curve.axes[0][()], q_nm)
            np.testing.assert_allclose(curve.signal[()], intensity[index], rtol=1e-6)
            np.testing.assert_allclose(curve.errors[()], intensity_sd[index], rtol=1e-6)
        every = NXdata(handle["entry/line_out/plot"])  # the live line-outs, as one 2-D plot
        assert every.is_valid and every.signal.shape == (FRAMES, q_nm.size)
        assert every.errors is not None


def test_nexusformat_reads_every_field(demo_file):
    with np.printoptions():  # nexusformat sets numpy's print threshold to 5 when imported
        from nexusformat.nexus import nxload

    intensity, intensity_sd, _ = _intensities(demo_file)
    root = nxload(str(demo_file), "r")
    unread = []

    def read(group, path: str) -> None:
        for name, item in group.items():
            if item.nxclass == "NXfield":
                try:
                    np.asarray(item.nxdata)
                except Exception as error:  # what a NeXpy user would see
                    unread.append(f"{path}/{name}: {error}")
            else:
                read(item, f"{path}/{name}")

    read(root, "")
    assert not unread
    for index in range(FRAMES):
        group = root[f"entry/sasdata_{index:06d}"]
        np.testing.assert_allclose(group["I"].nxdata, intensity[index], rtol=1e-6)
        np.testing.assert_allclose(group["Idev"].nxdata, intensity_sd[index], rtol=1e-6)


def test_sasview_reads_one_curve_per_exposure(demo_file):
    """One curve per exposure, without the masked bins (sasdata leaves NaN points out)."""
    from sasdata.dataloader.loader import Loader

    intensity, intensity_sd, q_nm = _intensities(demo_file)
    curves = Loader().load(str(demo_file))
    assert len(curves) == FRAMES  # the live line-outs are not read as one more curve
    for curve, index in zip(curves, range(FRAMES), strict=True):
        observed = np.isfinite(intensity[index])
        np.testing.assert_allclose(curve.x, q_nm[observed] / 10)  # in 1/A
        np.testing.assert_allclose(curve.y, intensity[index][observed], rtol=1e-6)
        np.testing.assert_allclose(curve.dy, intensity_sd[index][observed], rtol=1e-6)


HOLDER = """
import glob, sys, time, h5py
while not glob.glob(sys.argv[1] + "/*.h5"):  # open the file the moment it appears
    time.sleep(0.001)
handle = h5py.File(glob.glob(sys.argv[1] + "/*.h5")[0], "r", swmr=True)
print("holding", flush=True)
time.sleep(600)
"""

POLLER = """
import glob, sys, time
from pipeline.store import open_results
while not glob.glob(sys.argv[1] + "/*.h5"):
    time.sleep(0.001)
path = glob.glob(sys.argv[1] + "/*.h5")[0]
polls = 0
while True:
    open_results(path)  # an error ends the poller: the test sees it
    polls += 1
    print(polls, flush=True)
    time.sleep(0.02)
"""


@pytest.mark.slow  # 24-32 s each: the default suite stays under 15 min
@pytest.mark.parametrize("viewer", ["holder", "poller"])
def test_a_demo_finishes_its_file_while_a_viewer_holds_or_polls_it(tmp_path, viewer):
    """A viewer (h5py in SWMR mode, holding the file from its creation to the end; or
    open_results every 20 ms) does not keep the demo from finishing the file: it prints its
    summary and exits 0, and the file is complete, with a SASdata group per exposure."""
    out = tmp_path / "out"
    out.mkdir()
    frames = 120
    script = HOLDER if viewer == "holder" else POLLER
    watcher = subprocess.Popen(
        [sys.executable, "-c", script, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)  # the viewer is watching the folder
        demo = subprocess.run(
            [sys.executable, "-m", "flows.cli", "demo", "--frames", str(frames), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert watcher.poll() is None, watcher.communicate()[1]  # it held or polled throughout
    finally:
        watcher.kill()
        printed, errors = watcher.communicate()
    assert demo.returncode == 0, demo.stderr
    assert f"exposures:  {frames} ({frames} written, 0 failed)" in demo.stdout
    assert printed.strip(), errors  # it opened the file
    (path,) = out.glob("*.h5")
    completion = read_completion(path)
    assert completion is not None and completion.n_exposures == frames
    with h5py.File(path, "r", swmr=True) as handle:
        groups = [name for name in handle["entry"] if name.startswith("sasdata_")]
    assert len(groups) == frames
