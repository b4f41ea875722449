"""Scratch folders named after their process: what a killed run left goes at the next start."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from fabio.edfimage import EdfImage

from pipeline.config import InferenceConfig, IntegrationConfig, PipelineConfig
from pipeline.preflight import settings_for_model
from pipeline.scratch import make_scratch_dir, remove_stale_scratch_dirs
from pipeline.sources import FileSource, ReadAhead
from pipeline.store import open_results
from workers.feeder import Feeder


def finished_pid() -> int:
    """The PID of a process that has run and gone (as after a SIGKILL)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_folders_of_finished_processes_go_and_those_of_running_ones_stay(tmp_path):
    dead = finished_pid()
    stale = [tmp_path / f"run-{dead}-abc", tmp_path / f"run-{dead}-def"]
    for folder in stale:
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "slot.bin").write_bytes(b"frame")
    running = tmp_path / f"run-{os.getpid()}-abc"
    running.mkdir()
    other_prefix = tmp_path / f"other-{dead}-abc"
    other_prefix.mkdir()
    assert sorted(remove_stale_scratch_dirs("run-", tmp_path)) == stale
    assert sorted(tmp_path.iterdir()) == [other_prefix, running]
    made = make_scratch_dir("run-", tmp_path)
    assert made.is_dir() and made.name.startswith(f"run-{os.getpid()}-")
    assert (made.stat().st_mode & 0o777) == 0o700  # private, as tempfile.mkdtemp makes them


def test_names_without_a_pid_files_and_links_are_left_alone(tmp_path):
    dead = finished_pid()
    kept = [
        tmp_path / "run-k3x9q1ab",  # tempfile.mkdtemp's name, from before PIDs were named
        tmp_path / "run-0-abc",  # no process has PID 0
        tmp_path / f"run-{dead}",  # no separator after the PID
    ]
    for folder in kept:
        folder.mkdir()
    (tmp_path / f"run-{dead}-file").write_text("not a folder")
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / f"run-{dead}-link").symlink_to(target)
    assert remove_stale_scratch_dirs("run-", tmp_path) == []
    assert all(path.exists() for path in [*kept, target, tmp_path / f"run-{dead}-link"])
    assert remove_stale_scratch_dirs("run-", tmp_path / "absent") == []


def test_a_scan_removes_the_run_folder_a_killed_one_left_and_takes_float32_frames_read_ahead(
    tmp_path, small_detector
):
    # a run killed with SIGKILL leaves binn-<its pid>-...; the next run's start removes it
    stale = Path(tempfile.gettempdir()) / f"binn-{finished_pid()}-killed"
    (stale / "sockets").mkdir(parents=True)
    poni = small_detector.poni  # 48 x 64 pixels: the shape is taken from the first frame
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(4)
    for number in range(3):  # float32 frames: read-only views of shared memory when read ahead
        frame = rng.poisson(20.0, (48, 64)).astype(np.float32)
        EdfImage(data=frame).write(str(frames / f"f_{number}.edf"))
    config = PipelineConfig(
        scan_id="after-a-kill",
        n_workers=1,
        output_dir=tmp_path / "out",
        integration=IntegrationConfig(poni=poni, azimuth_range_deg=None),
        inference=InferenceConfig(n_samples=50, model=small_detector.model),
    )
    config = settings_for_model(config)  # the small detector's model's grid
    with ReadAhead(FileSource(frames, "after-a-kill")) as source, Feeder(config) as feeder:
        assert not stale.exists()
        run_dir = feeder.run_dir
        assert run_dir.name.startswith(f"binn-{os.getpid()}-")
        for exposure in source.exposures():
            feeder.submit(exposure)
        summary = feeder.wait()
    assert summary.written_ok == 3 and summary.failed == 0, summary.failures
    assert (open_results(config.output_path).status == "ok").all()
    assert not run_dir.exists()
