"""The scan runner end to end without Prefect: processes, ZeroMQ, HDF5, bad frames."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.config import PipelineConfig
from pipeline.sources import SimulatedDetector
from pipeline.store import read_results
from workers.scan import ScanRunner


def test_bad_frames_are_recorded_and_the_scan_goes_on(tmp_path):
    config = PipelineConfig(scan_id="bad-input", n_workers=1, output_dir=tmp_path)
    exposures = list(SimulatedDetector(config.integration, seed=7).exposures("bad-input", 10))
    exposures[2].frame = exposures[2].frame[:100]
    exposures[4].frame = exposures[4].frame.astype(np.float32)
    exposures[4].frame[10, 10] = np.nan
    exposures[6].frame = exposures[6].frame.astype(np.float32) - 5.0  # negative counts
    exposures[8].frame, exposures[8].error = None, "truncated file: scan_00008.cbf"
    with ScanRunner(config) as runner:
        for exposure in exposures:
            runner.submit(exposure)
        with pytest.raises(ValueError, match="already submitted"):
            runner.submit(exposures[0])
        summary = runner.wait()

    assert summary.submitted == 10 and summary.written_ok == 6 and summary.failed == 4
    assert summary.duplicates == 0
    results = read_results(config.output_path)
    assert results.index.tolist() == list(range(10))  # every exposure exactly once
    failed = {
        int(i): e
        for i, s, e in zip(results.index, results.status, results.error, strict=True)
        if s != "ok"
    }
    assert set(failed) == {2, 4, 6, 8}
    assert "shape" in failed[2] and "NaN" in failed[4] and "negative" in failed[6]
    assert "truncated" in failed[8]
    ok = results.status == "ok"
    assert np.isfinite(results.samples[ok]).all() and results.samples.shape[1:] == (1000, 5)
    np.testing.assert_allclose(results.truth[0], list(exposures[0].truth.values()))
    assert (config.output_dir / "logs" / "bad-input" / "worker-0.log").exists()


def test_an_existing_results_file_stops_the_scan_before_it_starts(tmp_path):
    config = PipelineConfig(scan_id="exists", n_workers=1, output_dir=tmp_path)
    config.output_path.write_bytes(b"earlier results")
    with pytest.raises(FileExistsError):
        ScanRunner(config).start()
    assert config.output_path.read_bytes() == b"earlier results"


FEEDER = """
import sys, time
from pathlib import Path
from pipeline.config import PipelineConfig
from pipeline.sources import SimulatedDetector
from workers.scan import ScanRunner

config = PipelineConfig(scan_id="killed", n_workers=1, output_dir=Path(sys.argv[1]))
runner = ScanRunner(config).start()
for exposure in SimulatedDetector(config.integration, seed=3).exposures("killed", 6):
    runner.submit(exposure)
runner.wait()
print(*runner.pids, flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_children_exit_and_the_file_stays_readable_when_the_feeder_is_killed(tmp_path):
    feeder = subprocess.Popen(
        [sys.executable, "-c", FEEDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        pids = [int(pid) for pid in feeder.stdout.readline().split()]
    finally:
        feeder.send_signal(signal.SIGKILL)
        feeder.wait()
    assert len(pids) == 2
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(pid) for pid in pids), "children outlived their feeder"
    results = read_results(tmp_path / "killed.h5")
    assert results.index.tolist() == list(range(6)) and (results.status == "ok").all()
