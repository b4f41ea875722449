"""``beamline-inn demo`` end to end: Prefect flow, 2 worker processes, one HDF5 file."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import h5py
import hdf5plugin
import numpy as np
import pytest

from flows.cli import main
from pipeline.store import open_results


def test_demo_writes_every_exposure_exactly_once(prefect_harness, tmp_path, capsys):
    assert main(["demo", "--frames", "24", "--workers", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "exposures:  24 (24 written, 0 failed)" in printed
    (path,) = tmp_path.glob("*.h5")
    assert str(path) in printed
    results = open_results(path)
    assert results.index.tolist() == list(range(24))
    assert (results.status == "ok").all()
    assert results.samples.shape == (24, 1000, 5) and np.isfinite(results.samples).all()
    assert results.parameter_names[:3] == ("pitch_nm", "width_nm", "sigma_nm")
    assert results.model_card["weights_sha256"]
    source = json.loads(results.config_json)["source"]
    assert source == {"kind": "simulated", "n_frames": 24, "seed": 0, "instrument": None}


def test_reprocess_reads_files_and_records_the_unreadable_ones(prefect_harness, tmp_path, capsys):
    import fabio

    from pipeline.config import IntegrationConfig
    from pipeline.integration import DEFAULT_PONI
    from pipeline.sources import SimulatedDetector

    frames = tmp_path / "frames"
    frames.mkdir()
    detector = SimulatedDetector(IntegrationConfig(), seed=11)
    exposures = list(detector.scan("archive", 5).exposures())
    for exposure in exposures:
        path = frames / f"scan_{exposure.index + 1}.cbf"  # scan_1 ... scan_5: natural order
        fabio.cbfimage.CbfImage(data=exposure.frame.astype(np.int32)).write(str(path))
    whole = (frames / "scan_3.cbf").read_bytes()
    (frames / "scan_3.cbf").write_bytes(whole[: len(whole) // 2])  # truncated
    (frames / "scan_6.cbf").write_bytes(b"not a detector frame")
    eiger = frames / "eiger_data_000001.h5"  # an Eiger data file, bitshuffle-LZ4, 2 frames
    with h5py.File(eiger, "w") as handle:
        handle.create_dataset(
            "entry/data/data",
            data=np.stack([e.frame for e in exposures[:2]]),
            chunks=(1, *exposures[0].frame.shape),
            **hdf5plugin.Bitshuffle(cname="lz4"),
        )
    out = tmp_path / "out"
    options = ["--poni", str(DEFAULT_PONI), "--out", str(out), "--scan-id", "archive"]
    paths = [str(frames / "scan_*.cbf"), str(eiger)]
    status = main(["reprocess", *paths, *options, "--workers", "1", "--samples", "200"])
    printed = capsys.readouterr().out
    assert status == 1 and "exposures:  8 (6 written, 2 failed)" in printed, printed
    results = open_results(out / "archive.h5")
    assert results.index.tolist() == list(range(8))
    # natural order over all paths: the Eiger file's 2 frames, then scan_1 ... scan_6
    assert results.status.tolist() == ["ok", "ok", "ok", "ok", "failed", "ok", "ok", "failed"]
    assert "eiger_data_000001.h5" in results.source[0] and "frame 1" in results.source[1]
    assert results.source[2].endswith("scan_1.cbf") and results.source[7].endswith("scan_6.cbf")
    assert results.error[4] and results.error[7]
    truth_pitch = [e.truth["pitch_nm"] for e in exposures]
    medians = np.median(results.samples[:, :, 0], axis=1)
    # the line-outs reach the model intact: (row, simulated frame)
    for row, frame in ((0, 0), (1, 1), (2, 0), (3, 1), (5, 3), (6, 4)):
        assert abs(medians[row] - truth_pitch[frame]) < 2.0
    # read ahead by a reader process, which pyFAI's engine leaves a core (saved with the results)
    threads = max(1, (os.cpu_count() or 1) - 1)
    config = json.loads(results.config_json)
    assert config["integration"]["openmp_threads"] == threads
    # what was read is saved with the results
    assert config["source"] == {
        "kind": "files",
        "paths": paths,
        "hdf5_dataset": None,
        "read_ahead": 4,
    }


def test_reprocess_reads_a_stack_at_another_path_with_hdf5_dataset(
    prefect_harness, tmp_path, capsys, reliability, small_detector
):
    """``--hdf5-dataset``: a 3-D dataset outside the Eiger and NeXus places gives one exposure
    per frame, read ahead by the reader process. The PONI names no detector: its shape is the
    most common one in the files' headers, so an odd first frame fails alone (the small
    detector's model: its geometry is not the default model's)."""
    import fabio

    poni = small_detector.poni
    scan = tmp_path / "scan"
    scan.mkdir()
    frames = np.random.default_rng(3).poisson(50, (5, 48, 64)).astype(np.int32)
    with h5py.File(scan / "run.h5", "w") as handle:
        handle["measurement/pilatus"] = frames[:3]
    for number in (4, 5):
        fabio.cbfimage.CbfImage(data=frames[number - 1]).write(str(scan / f"run_{number}.cbf"))
    odd = scan / "a_cropped.cbf"  # read first, in natural order
    fabio.cbfimage.CbfImage(data=frames[0, :47]).write(str(odd))
    out = tmp_path / "out"
    options = ["--poni", str(poni), "--full-ring", "--out", str(out), "--scan-id", "stack"]
    options += ["--model", str(small_detector.model)]
    stack = [str(scan), "--hdf5-dataset", "/measurement/pilatus"]
    status = main(["reprocess", *stack, *options, "--workers", "1", "--samples", "50"])
    printed = capsys.readouterr().out
    assert status == 1 and "exposures:  6 (5 written, 1 failed)" in printed, printed
    results = open_results(out / "stack.h5")
    assert results.index.tolist() == list(range(6))
    assert results.status.tolist() == ["failed", "ok", "ok", "ok", "ok", "ok"]
    expected = "does not match the detector shape (48, 64), taken from the frame files' headers"
    assert "frame shape (47, 64) " + expected in results.error[0]
    assert results.source[3].endswith("run.h5:/measurement/pilatus frame 2")
    assert json.loads(results.config_json)["integration"]["detector_shape"] == [48, 64]
    reliability.record(
        "bad input",
        "a PONI without a detector and a first frame of another shape (HDF5 at another path)",
        tried=1,
        accepted=6,
        **reliability.tally(out / "stack.h5", set(range(6))),
        detail=f"the first frame failed alone: {results.error[0][:120]}...",
    )


def test_online_reconstructs_a_live_series_from_a_third_party_detector(
    prefect_harness, eiger_simulator, tmp_path, capsys, small_detector
):
    """ALBA's eiger-simulator streams 100 bitshuffle-LZ4 images at 20 Hz (SIMPLON stream v1);
    every one is integrated, reconstructed and written once, and the scan's time and rate
    count from the detector's acquisition times (frames waited in the socket while the
    workers started: the rate was once given as 726/s for this 5 s series). The small
    detector's model: the geometry is checked against it at the first frame. Two integrator
    processes: the stream leaves its frames compressed, and they decode them."""
    poni = small_detector.poni
    out = tmp_path / "out"
    eiger_simulator.configure(100, "bslz4", count_time_s=0.05)
    failures: list[BaseException] = []

    def operator() -> None:  # arms the detector once the pipeline has opened its results file
        try:
            deadline = time.monotonic() + 240
            while not (out / "live.h5").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            eiger_simulator.arm()
            thread, errors = eiger_simulator.trigger_in_background()
            thread.join(60)
            failures.extend(errors)
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    stream = ["--stream", eiger_simulator.stream, "--protocol", "dectris-v1"]
    options = ["--poni", str(poni), "--full-ring", "--out", str(out), "--scan-id", "live"]
    options += ["--model", str(small_detector.model), "--workers", "1", "--integrators", "2"]
    status = main(["online", *stream, *options, "--samples", "100", "--idle-timeout", "10"])
    thread.join(60)
    assert not failures, failures
    printed = capsys.readouterr().out
    assert status == 0 and "exposures:  100 (100 written, 0 failed)" in printed, printed
    (scan_time,) = [line for line in printed.splitlines() if line.startswith("scan time:")]
    seconds, rate = (float(n) for n in re.findall(r"[\d.]+", scan_time)[:2])
    assert seconds >= 4.9 and rate <= 20.5, scan_time
    results = open_results(out / "live.h5")
    assert results.index.tolist() == list(range(100)) and (results.status == "ok").all()
    assert all(eiger_simulator.stream in source for source in results.source)
    assert np.isfinite(results.samples).all()


def test_online_watch_takes_frames_as_a_detector_writes_them(
    prefect_harness, tmp_path, capsys, small_detector
):
    import fabio

    poni = small_detector.poni
    incoming, out = tmp_path / "incoming", tmp_path / "out"
    incoming.mkdir()
    rng = np.random.default_rng(5)

    def write(number: int) -> None:
        frame = rng.poisson(20.0, (48, 64)).astype(np.int32)
        fabio.edfimage.EdfImage(data=frame).write(str(incoming / f"frame_{number}.edf"))

    write(1)
    write(2)
    (incoming / "notes.txt").write_text("not a frame, not matched by the pattern")

    def detector() -> None:  # goes on writing once the pipeline is running
        deadline = time.monotonic() + 240
        while not (out / "watched.h5").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        for number in (3, 4, 10):
            time.sleep(0.5)
            write(number)
        stack = rng.poisson(20.0, (2, 48, 64)).astype(np.int32)
        with h5py.File(incoming / "frame_11.h5.part", "w") as handle:
            handle["measurement/pilatus"] = stack  # at --hdf5-dataset
        os.rename(incoming / "frame_11.h5.part", incoming / "frame_11.h5")

    thread = threading.Thread(target=detector, daemon=True)
    thread.start()
    watch = ["--watch", str(incoming), "--pattern", "frame_*[0-9].[eh][d5]*", "--idle-timeout", "4"]
    watch += ["--hdf5-dataset", "/measurement/pilatus"]
    options = ["--poni", str(poni), "--full-ring", "--out", str(out), "--scan-id", "watched"]
    options += ["--model", str(small_detector.model)]
    status = main(["online", *watch, *options, "--workers", "1", "--samples", "100"])
    thread.join(10)
    assert status == 0, capsys.readouterr().out
    results = open_results(out / "watched.h5")
    assert results.index.tolist() == list(range(7)) and (results.status == "ok").all()
    names = [source.rsplit("/", 1)[-1] for source in results.source]
    assert names[:5] == ["frame_1.edf", "frame_2.edf", "frame_3.edf", "frame_4.edf", "frame_10.edf"]
    stack = [source.rsplit("/", 3)[-3:] for source in results.source[5:]]
    assert stack == [["frame_11.h5:", "measurement", f"pilatus frame {n}"] for n in (0, 1)]


def _writer_of(command: subprocess.Popen, timeout_s: float = 120.0) -> int:
    """The process id of the results writer a command started (its child)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = subprocess.run(
            ["pgrep", "-P", str(command.pid), "-f", "workers.writer"],
            capture_output=True,
            text=True,
        ).stdout.split()
        if found:
            return int(found[0])
        time.sleep(0.1)
    raise AssertionError("no writer started")


@pytest.mark.slow  # 30 s
def test_a_demo_whose_writer_cannot_start_again_stops_in_one_paragraph(tmp_path):
    """The writer killed, and its file damaged meanwhile: the writer started again cannot
    continue it, and the command says so in a few lines (exit code 3), with the writer's
    own reason and no traceback (Prefect's reports stay in its API)."""
    out = tmp_path / "out"
    demo = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "demo", "--frames", "1500", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        writer = _writer_of(demo)
        deadline = time.monotonic() + 120
        while not list(out.glob("*.h5")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # exposures written
        os.kill(writer, signal.SIGKILL)
        (path,) = out.glob("*.h5")
        path.write_bytes(b"damaged")
        _, errors = demo.communicate(timeout=300)
    finally:
        demo.kill()
    assert demo.returncode == 3, errors
    assert "Traceback" not in errors
    said = [line for line in errors.splitlines() if "beamline-inn demo:" in line]
    assert said[0].startswith("beamline-inn demo: the scan stopped: the results writer exited")
    assert "writer: cannot resume" in errors  # the new writer's reason, from its log
