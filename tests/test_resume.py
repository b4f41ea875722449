"""Resuming by frame identity: a changed folder never loses, doubles or mixes an exposure;
one writer per results file; setup errors before anything starts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fabio
import numpy as np
import pytest

from flows.cli import main
from flows.reprocess import name_scans, plan
from pipeline.config import InferenceConfig, IntegrationConfig, PipelineConfig, ScanSettings
from pipeline.exposure import Exposure
from pipeline.integration import DEFAULT_PONI
from pipeline.model import DEFAULT_MODEL
from pipeline.model.checkpoint import card_path
from pipeline.physics import PARAMETER_NAMES, PARAMETER_UNITS
from pipeline.preflight import SetupError, check_setup
from pipeline.sources import FileSource, SimulatedDetector, find_scans
from pipeline.sources.identity import FileStamp, FrameId
from pipeline.store import ResultsWriter, open_results, read_completion
from pipeline.store.lock import ResultsBusy, ResultsLock
from pipeline.store.results import stored_identities
from pipeline.store.resume import ResumePlan
from workers.feeder import Feeder

FRAMES = [e.frame for e in SimulatedDetector(IntegrationConfig(), seed=5).scan("f", 6).exposures()]


def _write(path: Path, frame: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fabio.cbfimage.CbfImage(data=frame.astype(np.int32)).write(str(path))
    return path


def _config(out: Path, scan_id: str = "scan", **update) -> PipelineConfig:
    return PipelineConfig(
        scan_id=scan_id,
        n_workers=1,
        output_dir=out,
        inference=InferenceConfig(n_samples=20),
        **update,
    )


def _scan(config: PipelineConfig, paths: list, resume=False, exposures=None, retry_failed=False):
    """Run ``paths`` (or ``exposures`` of them) through a feeder (no Prefect), as
    ``reprocess`` does; its summary."""
    source = FileSource(paths, config.scan_id)
    with Feeder(
        config, resume=resume, manifest=source.manifest(), retry_failed=retry_failed
    ) as feeder:
        for exposure in exposures or source.exposures():
            feeder.submit(exposure)
        summary = feeder.wait()
        feeder.complete = True
    return summary


def _rows_by_source(path: Path) -> dict[str, int]:
    results = open_results(path)
    sources = [Path(s).name for s in results.source]
    assert len(set(sources)) == len(sources), f"a frame stored twice: {sources}"
    return dict(zip(sources, results.index.tolist(), strict=True))


def test_a_file_added_mid_folder_is_processed_on_resume_and_nothing_is_stored_twice(
    tmp_path, reliability
):
    folder = tmp_path / "frames"
    for number in (1, 2, 4, 5):
        _write(folder / f"scan_{number:03d}.cbf", FRAMES[number])
    config = _config(tmp_path / "out")
    _scan(config, [folder])
    assert read_completion(config.output_path).n_exposures == 4
    _write(folder / "scan_003.cbf", FRAMES[3])  # sorts between the files already done

    summary = _scan(config, [folder], resume=True)
    rows = _rows_by_source(config.output_path)
    reliability.record(
        "bad input",
        "a file added in the middle of a folder, then --resume",
        tried=1,
        accepted=5,
        **reliability.tally(config.output_path, set(range(5))),
        detail=f"resumed: {summary.skipped} kept, {summary.written_ok} computed; rows "
        f"{sorted(rows.values())}, each file once",
    )
    assert summary.skipped == 4 and summary.written_ok == 1
    assert set(rows) == {f"scan_{n:03d}.cbf" for n in range(1, 6)}
    assert rows["scan_003.cbf"] == 4  # numbered after the rows in the file
    assert read_completion(config.output_path).n_exposures == 5
    _, _, frame_ids = stored_identities(config.output_path)
    frames = [FrameId.parse(text) for text in frame_ids]
    assert all(frames) and len({f.location for f in frames}) == 5


@pytest.mark.slow  # 30-40 s: two or three scans; run by .ci/run (slow and reliability)
def test_a_changed_file_is_redone_under_its_index_and_a_removed_one_is_reported(
    tmp_path, reliability
):
    folder = tmp_path / "frames"
    for number in range(3):
        _write(folder / f"f_{number}.cbf", FRAMES[number])
    config = _config(tmp_path / "out")
    _scan(config, [folder])
    before = open_results(config.output_path)
    _write(folder / "f_1.cbf", FRAMES[4])  # rewritten with another frame
    (folder / "f_2.cbf").unlink()

    summary = _scan(config, [folder], resume=True)
    after = open_results(config.output_path)
    reliability.record(
        "bad input",
        "a file rewritten and another deleted, then --resume",
        tried=1,
        accepted=3,
        **reliability.tally(config.output_path, {0, 1, 2}),
        detail=f"rewritten file redone under its index ({summary.redone}), deleted file's row "
        f"kept and reported ({summary.removed}); rows {after.index.tolist()}",
    )
    assert (summary.skipped, summary.written_ok, summary.redone, summary.removed) == (1, 1, 1, 1)
    assert after.index.tolist() == [0, 1, 2]  # f_1 redone as exposure 1, f_2's row kept
    np.testing.assert_array_equal(after.counts[[0, 2]], before.counts[[0, 2]])
    assert not np.array_equal(after.counts[1], before.counts[1])
    assert read_completion(config.output_path).n_exposures == 3


@pytest.mark.slow  # 30-40 s: two or three scans; run by .ci/run (slow and reliability)
def test_failed_rows_are_redone_only_when_asked(tmp_path, reliability):
    folder = tmp_path / "frames"
    for number in range(2):
        _write(folder / f"f_{number}.cbf", FRAMES[number])
    config = _config(tmp_path / "out")
    exposures = list(FileSource([folder], "scan").exposures())
    exposures[1].frame, exposures[1].error = None, "NFS timeout (transient)"
    _scan(config, [folder], exposures=iter(exposures))
    assert open_results(config.output_path).status.tolist() == ["ok", "failed"]

    again = _scan(config, [folder], resume=True)  # the file is unchanged: the row stays
    assert (again.skipped, again.submitted) == (2, 0)
    retried = _scan(config, [folder], resume=True, retry_failed=True)
    assert (retried.skipped, retried.written_ok, retried.redone) == (1, 1, 1)
    results = open_results(config.output_path)
    reliability.record(
        "bad input",
        "a failed row resumed without and with --retry-failed",
        tried=2,
        accepted=2,
        **reliability.tally(config.output_path, {0, 1}),
        detail=f"without: {again.skipped} kept as they were; with: {retried.redone} redone, "
        f"status now {results.status.tolist()}",
    )
    assert results.index.tolist() == [0, 1] and (results.status == "ok").all()


def test_a_resume_with_another_geometry_or_model_is_refused_in_one_line(tmp_path, reliability):
    folder = tmp_path / "frames"
    _write(folder / "f_0.cbf", FRAMES[0])
    config = _config(tmp_path / "out")
    _scan(config, [folder])
    moved = tmp_path / "moved.poni"  # recalibrated: 1 mm closer, still the model's instrument
    moved.write_text(DEFAULT_PONI.read_text().replace("Distance: 5.0", "Distance: 4.999"))
    assert "Distance: 4.999" in moved.read_text()
    other = config.model_copy(update={"integration": IntegrationConfig(poni=moved)})
    with pytest.raises(
        SetupError, match=r"its geometry \(PONI\) differs from this run's"
    ) as refused:
        check_setup(other, resume=True)
    assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="geometry"):
        Feeder(other, resume=True).start()
    samples = config.model_copy(update={"inference": InferenceConfig(n_samples=30)})
    with pytest.raises(SetupError, match="its samples per exposure differs"):
        check_setup(samples, resume=True)
    assert open_results(config.output_path).index.tolist() == [0]  # untouched
    reliability.record(
        "bad input",
        "--resume with another geometry, or another number of samples",
        tried=2,
        accepted=1,
        **reliability.tally(config.output_path, {0}),
        detail=f"refused before anything starts: {refused.value}",
    )


def test_a_second_run_on_a_results_file_is_refused_while_the_first_writes(tmp_path, reliability):
    folder = tmp_path / "frames"
    for number in range(3):
        _write(folder / f"f_{number}.cbf", FRAMES[number])
    config = _config(tmp_path / "out")
    source = FileSource([folder], "scan")
    with Feeder(config, manifest=source.manifest()) as first:
        exposures = source.exposures()
        first.submit(next(exposures))
        with pytest.raises(ResultsBusy, match="being written by another run"):
            Feeder(config, resume=True).start()
        with pytest.raises(SetupError, match="being written by another run"):
            check_setup(config, resume=True)
        for exposure in exposures:
            first.submit(exposure)
        first.wait()
    rows = open_results(config.output_path).index.tolist()
    reliability.record(
        "fault",
        "--resume started while the first run still writes its file",
        tried=1,
        accepted=3,
        **reliability.tally(config.output_path, {0, 1, 2}),
        detail="the second run refused (the file's lock, held by the first run and its "
        f"writer); the first wrote {len(rows)} of 3",
    )
    assert rows == [0, 1, 2]
    ResultsLock(config.output_path).check()  # free again


def test_the_lock_of_a_killed_run_is_free_at_once(tmp_path):
    path = tmp_path / "scan.h5"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from pipeline.store.lock import "
            f"ResultsLock; ResultsLock(Path({str(path)!r})).acquire(); print('held', flush=True);"
            " time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ResultsBusy, match=f"process {holder.pid}"):
        ResultsLock(path).check()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    ResultsLock(path).check()


def test_scans_of_the_same_name_in_other_folders_get_their_own_files(tmp_path, reliability):
    for day in ("day1", "day2"):
        for number in range(2 if day == "day1" else 3):
            _write(tmp_path / day / "sampleA" / f"f_{number}.cbf", FRAMES[number])
    settings = ScanSettings(
        output_dir=tmp_path / "out", n_workers=1, inference=InferenceConfig(n_samples=20)
    )
    (day1,) = name_scans(find_scans([tmp_path / "day1" / "sampleA"]), settings)
    assert day1.scan_id == "sampleA"
    config = settings.for_scan("sampleA", scan_source=os.path.realpath(day1.path))
    _scan(config, [day1.path])
    to_run, skipped = plan([day1], settings)
    assert not to_run and "complete: 2 exposures" in skipped["sampleA"]

    (day2,) = name_scans(find_scans([tmp_path / "day2" / "sampleA"]), settings)
    assert day2.scan_id.startswith("sampleA-") and len(day2.scan_id) == len("sampleA-") + 8
    both = name_scans(find_scans([tmp_path / "day*" / "sampleA"]), settings)
    assert [scan.scan_id for scan in both] == ["sampleA", day2.scan_id]  # the same every run
    to_run, skipped = plan(both, settings)
    reliability.record(
        "bad input",
        "reprocess-scans of day2/sampleA into the folder that holds day1/sampleA's results",
        tried=1,
        accepted=3,
        lost=0 if [scan.scan_id for scan in to_run] == [day2.scan_id] else 3,
        detail=f"day2's scan is {day2.scan_id} (its own file), day1's stays skipped as complete",
    )
    assert [scan.scan_id for scan in to_run] == [day2.scan_id] and list(skipped) == ["sampleA"]

    _write(tmp_path / "day1" / "sampleA" / "f_9.cbf", FRAMES[5])  # a complete scan grows
    to_run, _ = plan([day1], settings)
    assert [scan.scan_id for scan in to_run] == ["sampleA"]


@pytest.mark.parametrize(
    "problem",
    [
        "negative distance",
        "mask of the wrong shape",
        "missing model",
        "tampered model",
        "output under a file",
        "output that cannot be made",
        "existing results file",
        "resume of another scan's file",
    ],
)
def test_setup_errors_are_one_line_and_exit_2_before_anything_starts(
    tmp_path, capsys, problem, reliability
):
    folder = tmp_path / "frames"
    _write(folder / "f_0.cbf", FRAMES[0])
    poni, out = DEFAULT_PONI, tmp_path / "out"
    extra: list[str] = []
    if problem == "negative distance":
        poni = tmp_path / "bad.poni"
        poni.write_text(DEFAULT_PONI.read_text().replace("Distance: 5.0", "Distance: -5.0"))
    elif problem == "mask of the wrong shape":
        np.save(tmp_path / "mask.npy", np.zeros((10, 10), np.uint8))
        extra = ["--mask", str(tmp_path / "mask.npy")]
    elif problem == "missing model":
        extra = ["--model", str(tmp_path / "nowhere.safetensors")]
    elif problem == "tampered model":
        model = tmp_path / "model.safetensors"
        data = bytearray(DEFAULT_MODEL.read_bytes())
        data[-1] ^= 0xFF
        model.write_bytes(bytes(data))
        shutil.copy(card_path(DEFAULT_MODEL), card_path(model))
        extra = ["--model", str(model)]
    elif problem == "output under a file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    elif problem == "output that cannot be made":
        out = Path("/proc/beamline-inn-out")  # root too cannot make a folder there
    elif problem == "existing results file":
        out.mkdir()
        (out / "frames.h5").write_bytes(b"an earlier run's file")
    elif problem == "resume of another scan's file":  # say, a salvaged file, renamed
        q_nm = np.linspace(0.01, 0.4, 512)
        with ResultsWriter(
            out / "other.h5", PARAMETER_NAMES, PARAMETER_UNITS, 4, q_nm, scan_id="elsewhere"
        ):
            pass
        extra = ["--scan-id", "other", "--resume"]
    started = time.monotonic()
    status = main(["reprocess", str(folder), "--poni", str(poni), "--out", str(out), *extra])
    error = capsys.readouterr().err
    reliability.record(
        "bad input",
        f"setup error: {problem}",
        tried=1,
        detail=f"exit {status} in {time.monotonic() - started:.1f} s: {error.strip()[:160]}",
    )
    assert status == 2, error
    assert error.count("\n") == 1 and error.startswith("beamline-inn reprocess: error:"), error
    made = sorted(p.name for p in out.glob("*.h5")) if out.is_dir() else []
    kept = {"existing results file": ["frames.h5"], "resume of another scan's file": ["other.h5"]}
    assert made == kept.get(problem, [])
    if problem == "resume of another scan's file":
        assert f"move it to {out / 'elsewhere.h5'} and resume with --scan-id elsewhere" in error


def test_a_file_of_an_earlier_version_is_resumed_by_exposure_index():
    """Rows without identities (written before they were stored, or simulated frames):
    frames, with identity or not, are matched by their index, as before."""
    stamp = FileStamp("b" * 32, 10, 1)
    plan = ResumePlan(
        np.array([0, 1]), np.array([False, True]), ["", ""], {stamp.key: stamp}, retry_failed=True
    )
    assert not plan.by_identity and plan.dropped == [1] and plan.n_kept_rows == 1

    def exposure(index: int) -> Exposure:
        return Exposure("s", index, 0.0, None, metadata={"frame_id": stamp.frame_id(index)})

    assert plan.place(exposure(0)) is None
    assert plan.place(exposure(1)).index == 1 and plan.place(exposure(2)).index == 2
