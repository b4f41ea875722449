"""The results file in the tools analysts use, on a demo's file: the NeXus validator
(pynxtools' ``pynx validate``), silx, nexusformat (NeXpy's library) and SasView's reader
(sasdata); and viewers that hold or poll the file while a demo writes it."""

import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import nexus_validation_problems

from flows.cli import main
from pipeline.store import open_results, read_completion

FRAMES = 6


@pytest.fixture(scope="module")
def demo_file(prefect_harness, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--frames", str(FRAMES), "--workers", "1", "--out", str(out)]) == 0
    (path,) = out.glob("*.h5")
    return path


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
    from sasdata.dataloader.loader import Loader

    intensity, intensity_sd, q_nm = _intensities(demo_file)
    curves = Loader().load(str(demo_file))
    assert len(curves) == FRAMES  # the live line-outs are not read as one more curve
    for curve, index in zip(curves, range(FRAMES), strict=True):
        np.testing.assert_allclose(curve.x, q_nm / 10)  # in 1/A
        np.testing.assert_allclose(curve.y, intensity[index], rtol=1e-6)
        np.testing.assert_allclose(curve.dy, intensity_sd[index], rtol=1e-6)


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
