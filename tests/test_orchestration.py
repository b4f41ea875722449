"""The Prefect side: monitoring artifacts and events, reprocessing on Dask, the online flow's
clean stop, the model flows, and the deployments file."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import fabio
import h5py
import numpy as np
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.events.filters import EventFilter, EventNameFilter

from flows.cli import main
from flows.deployments import load_deployments
from flows.monitor import (
    EVENT_FAILED,
    EVENT_FLAGGED,
    EVENT_SCAN,
    EVENT_WRITER_RESTARTED,
    MonitorIntervals,
    ScanMonitor,
    scan_key,
)
from flows.reprocess import (
    DaskCluster,
    ScanNotSettled,
    _retry_if_unsettled,
    name_scans,
    reprocess_one_scan,
    reprocess_scans,
)
from pipeline.config import InferenceConfig, IntegrationConfig, ScanSettings
from pipeline.integration import DEFAULT_PONI
from pipeline.physics import PARAMETER_NAMES
from pipeline.sources import ArchivedScan, SimulatedDetector, find_scans
from pipeline.store import ExposureResult, ResultsWriter, open_results, read_completion
from workers.feeder import RecentResult, WriterRestarted

REPO = Path(__file__).resolve().parents[1]


def _artifacts(flow_run_id) -> dict[str, list]:
    """The artifacts of a flow run (and of its task runs), by key, oldest first."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_key: dict[str, list] = {}
    for artifact in sorted(artifacts, key=lambda a: a.created):
        by_key.setdefault(artifact.key, []).append(artifact)
    return by_key


def _events(name: str, scan_id: str) -> list:
    with get_client(sync_client=True) as client:
        page = client.read_events(EventFilter(event=EventNameFilter(name=[name])), limit=50)
    return [e for e in page.events if e.resource.id == f"beamline-inn.scan.{scan_id}"]


def _write_scan(folder: Path, frames: list[np.ndarray]) -> None:
    folder.mkdir(parents=True)
    for number, frame in enumerate(frames):
        fabio.cbfimage.CbfImage(data=frame.astype(np.int32)).write(str(folder / f"f_{number}.cbf"))


def test_monitor_publishes_rate_limited_artifacts_and_alert_events(prefect_harness, tmp_path):
    """Per exposure only bookkeeping; the thread publishes the table, the plot (from the
    results file, followed while written), progress and one event per kind and interval.
    Against a real server: the keys name the scan, the progress (with its counts as its
    description), the table and the plot are each one version, updated in place, and the
    failed and flagged exposures reach the run's log."""
    names, units = PARAMETER_NAMES, ("nm",) * 3 + ("", "")
    path = tmp_path / "mon.h5"
    rng = np.random.default_rng(0)
    samples = rng.normal(100.0, 1.0, (50, 5)).astype(np.float32)
    quantiles = tuple(
        tuple(float(v) for v in row) for row in np.quantile(samples, [0.05, 0.5, 0.95], axis=0)
    )

    @flow
    def watched_scan() -> tuple[dict, dict, str]:
        with ResultsWriter(path, names, units, 50, np.linspace(0.01, 0.4, 512), scan_id="mon") as w:
            w.append(ExposureResult(0, 0.0, samples=samples))
            w.file.flush()
            monitor = ScanMonitor(
                "mon", path, expected=40, intervals=MonitorIntervals(0.05, 0.2, 0.2, 0.2)
            )
            for index in range(40):
                if index % 10 == 9:
                    result = RecentResult(index, "failed", 0.01, error=f"bad frame {index}")
                else:
                    z = 100.0 if index in (3, 4) else 1.0
                    result = RecentResult(index, "ok", 0.02, quantiles=quantiles, predictive_z=z)
                monitor.record(result)
                monitor.update(index + 1, 40)
                if index == 20:
                    monitor.writer_restarted(WriterRestarted(-9, 1, 12, 3))
                time.sleep(0.01)
            monitor.finish("# done")
        from prefect.runtime import flow_run

        return monitor.published, monitor.keys, flow_run.id

    published, keys, run_id = watched_scan()
    # rate-limited: 40 exposures in about 0.5 s, far fewer updates than exposures
    assert 1 <= published["table"] <= 6 and 1 <= published["plot"] <= 6, published
    artifacts = _artifacts(run_id)
    assert keys == {
        "progress": "scan-progress-mon",
        "table": "recent-exposures-mon",
        "plot": "scan-plots-mon",
        "summary": "scan-summary-mon",
    }
    assert set(keys.values()) <= set(artifacts)
    # one version each (within the version intervals), the newest content updated in place
    assert [len(artifacts[keys[kind]]) for kind in ("progress", "table", "plot")] == [1, 1, 1]
    assert published["table_versions"] == published["plot_versions"] == 1
    # the progress is of exposures written without failure: never 100% with failed ones
    (progress,) = artifacts[keys["progress"]]
    assert progress.data == 90.0
    assert progress.description == "Scan mon: 36 of 40 written, 4 failed, 2 flagged; " + (
        "newest exposure 39"
    )
    table = artifacts[keys["table"]][-1].data
    rows = __import__("json").loads(table) if isinstance(table, str) else table
    assert rows[0]["exposure"] == 39 and rows[0]["status"] == "failed"
    assert rows[0]["error"] == "bad frame 39" and len(rows) == 20
    ok = next(row for row in rows if row["status"] == "ok")
    assert ok["pitch_nm median [5%, 95%]"].startswith(f"{quantiles[1][0]:.2f}")
    assert artifacts[keys["plot"]][-1].data.startswith("data:image/png;base64,")
    named = ("9 (bad frame 9)", "19 (bad frame 19)", "39 (bad frame 39)", "3 (z 100)")
    lines = _run_log_lines(run_id, lambda found: all(n in " ".join(found) for n in named))
    problems = " ".join(line for line in lines if " failed:" in line or " flagged " in line)
    assert all(n in problems for n in named), lines
    deadline = time.monotonic() + 30  # events reach the API asynchronously
    while time.monotonic() < deadline:
        flagged, failed = _events(EVENT_FLAGGED, "mon"), _events(EVENT_FAILED, "mon")
        restarts = _events(EVENT_WRITER_RESTARTED, "mon")
        if sum(e.payload["count"] for e in failed) == 4 and flagged and restarts:
            break
        time.sleep(0.5)
    assert sorted(i for e in flagged for i in e.payload["exposures"]) == [3, 4]
    assert sorted(i for e in failed for i in e.payload["exposures"]) == [9, 19, 29, 39]
    assert any(r.id == f"prefect.flow-run.{run_id}" for r in failed[0].related)
    (restarted,) = restarts
    assert restarted.payload["exit_code"] == -9 and restarted.payload["resent"] == 12
    assert "started again on the file (1 of at most 3)" in restarted.payload["message"]
    # the scan's start and end, with the counts, for automations
    while time.monotonic() < deadline and not _events(EVENT_SCAN.format("finished"), "mon"):
        time.sleep(0.5)
    (started,) = _events(EVENT_SCAN.format("started"), "mon")
    (finished,) = _events(EVENT_SCAN.format("finished"), "mon")
    assert started.payload["submitted"] == 40 and started.payload["written"] == 0
    counts = {key: finished.payload[key] for key in ("submitted", "written", "failed", "flagged")}
    assert counts == {"submitted": 40, "written": 36, "failed": 4, "flagged": 2}


def test_monitor_goes_on_when_the_prefect_api_fails(
    prefect_harness, tmp_path, monkeypatch, monitor_warnings, reliability
):
    """A failing API call is logged once and the scan's bookkeeping goes on; when the API
    answers again, the log says so."""
    import flows.monitor

    calls = {"n": 0, "failed": 0}

    create_table_artifact = flows.monitor.create_table_artifact

    def flaky_table(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:
            calls["failed"] += 1
            raise ConnectionError("API unreachable")
        return create_table_artifact(*args, **kwargs)

    monkeypatch.setattr(flows.monitor, "create_table_artifact", flaky_table)

    @flow
    def scan() -> dict:
        monitor = ScanMonitor(
            "flaky", tmp_path / "none.h5", intervals=MonitorIntervals(10, 0.05, 10, 10)
        )
        for index in range(3):  # each record published on its own: 2 failures, 1 success
            before = calls["n"]
            monitor.record(RecentResult(index, "failed", 0.0, error="x"))
            deadline = time.monotonic() + 30
            while calls["n"] == before and time.monotonic() < deadline:
                time.sleep(0.01)
        monitor.finish("# done")
        return monitor.published

    published = scan()
    assert calls["n"] >= 3 and published["table"] == calls["n"] - 2
    assert published["table_versions"] == 1
    messages = monitor_warnings
    warnings = sum("failed, the scan goes on" in m for m in messages)
    reliability.record(
        "fault",
        "the Prefect API failing during a scan (table artifact updates of the monitor)",
        tried=calls["failed"],
        detail=f"{calls['failed']} updates failed, {warnings} warning logged; the scan's "
        f"bookkeeping went on; {published['table']} table update(s) published once it answered",
    )
    assert warnings == 1
    assert any("answers again after 2 failed updates" in m for m in messages)


def test_demo_creates_no_task_run_per_exposure(prefect_harness, tmp_path):
    """The per-exposure path makes no Prefect task run: 40 frames in batches of 16 are 3
    batch tasks and one wait; the UI gets progress, table, plots and summary."""
    from flows.scan import reconstruct_simulated_scan

    state = reconstruct_simulated_scan(
        n_frames=40, n_workers=1, output_dir=tmp_path, n_samples=100, return_state=True
    )
    summary = state.result()
    assert summary.written_ok == 40 and summary.complete
    # the run is named by its scan id and ends with the counts as its message; the quality
    # flags counted are the file's
    flagged = int(open_results(Path(summary.output_path)).flagged.sum())
    assert summary.flagged == flagged
    assert state.message == f"40 exposures: 40 written, 0 failed, {flagged} flagged"
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.name == summary.scan_id and summary.scan_id.startswith("sim-")
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    names = sorted(run.name.rsplit("-", 1)[0] for run in task_runs)
    assert names == ["integrate-and-send"] * math.ceil(40 / 16) + ["wait-for-results"]
    artifacts = _artifacts(run_id)
    key = scan_key(summary.scan_id)
    kinds = ("scan-progress", "recent-exposures", "scan-plots", "scan-summary")
    assert {f"{kind}-{key}" for kind in kinds} <= set(artifacts)
    # a short scan: one version of each, the newest content updated in place
    assert all(len(artifacts[f"{kind}-{key}"]) == 1 for kind in kinds), artifacts
    (progress,) = artifacts[f"scan-progress-{key}"]
    assert progress.data == 100.0
    assert re.fullmatch(
        rf"Scan {summary.scan_id}: 40 of 40 written, 0 failed, {flagged} flagged; "
        r"newest exposure \d+",
        progress.description,
    )
    assert read_completion(Path(summary.output_path)).n_exposures == 40


def test_a_scan_with_failed_exposures_ends_failed_or_completed_with_its_counts(
    prefect_harness, tmp_path
):
    """The run's state says how the data went: by default any failed exposure fails the run
    (as the command's exit code does), with the counts as the state's message; with
    ``max_failed_fraction`` above the scan's, it is Completed with the same message. The
    failed exposure, with its error, is in the run's log."""
    from flows.scan import ScanFailed, reprocess_scan, summary_of
    from pipeline.source_specs import ArchivedFiles

    detector = SimulatedDetector(IntegrationConfig(), seed=6)
    _write_scan(tmp_path / "scan", [e.frame for e in detector.scan("x", 3).exposures()])
    (tmp_path / "scan" / "f_3.cbf").write_bytes(b"not a detector frame")
    settings = ScanSettings(
        output_dir=tmp_path / "out",
        n_workers=1,
        integration=IntegrationConfig(poni=DEFAULT_PONI),
        inference=InferenceConfig(n_samples=100),
    )
    files = ArchivedFiles(paths=[str(tmp_path / "scan")])
    strict = settings.for_scan("strict", source=files)
    state = reprocess_scan(strict, return_state=True)
    message = "4 exposures: 3 written, 1 failed, 0 flagged"
    assert state.is_failed() and state.message.startswith(message)
    assert summary_of(state).failed == 1
    lines = _run_log_lines(
        state.state_details.flow_run_id,
        lambda found: any(line.startswith("1 exposure failed: 3 (") for line in found),
    )
    assert any(line.startswith("1 exposure failed: 3 (") for line in lines), lines
    with pytest.raises(ScanFailed, match=message):
        reprocess_scan(settings.for_scan("strict-again", source=files))
    lenient = strict.model_copy(update={"scan_id": "lenient", "max_failed_fraction": 0.5})
    state = reprocess_scan(lenient, return_state=True)
    assert state.is_completed() and state.message == message
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.name == "lenient"


@pytest.mark.slow  # 26 s: the default suite stays under 15 min
def test_reprocess_scans_on_dask_writes_three_files_and_skips_them_next_time(
    prefect_harness, tmp_path, capsys
):
    detector = SimulatedDetector(IntegrationConfig(), seed=3)
    frames = [exposure.frame for exposure in detector.scan("archive", 9).exposures()]
    for number in range(3):
        _write_scan(tmp_path / "archive" / f"night {number}", frames[3 * number : 3 * number + 3])
    settings = ScanSettings(
        output_dir=tmp_path / "out",
        n_workers=1,
        integration=IntegrationConfig(poni=DEFAULT_PONI),
        inference=InferenceConfig(n_samples=100),
    )
    patterns = [str(tmp_path / "archive" / "night*")]
    first = reprocess_scans(
        scans=patterns, expert=settings, cluster=DaskCluster(n_workers=2), settle_s=0
    )
    assert sorted(first) == ["night_0", "night_1", "night_2"]
    for number in range(3):
        path = tmp_path / "out" / f"night_{number}.h5"
        assert read_completion(path).n_exposures == 3
        results = open_results(path)
        assert results.index.tolist() == [0, 1, 2] and (results.status == "ok").all()
    modified = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.h5")}
    options = ["--poni", str(DEFAULT_PONI), "--out", str(tmp_path / "out"), "--workers", "1"]
    status = main(["reprocess-scans", *patterns, *options, "--samples", "100", "--settle", "0"])
    printed = capsys.readouterr().out
    assert status == 0 and printed.count("skipped (complete: 3 exposures") == 3, printed
    assert modified == {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.h5")}


def test_scan_still_being_written_is_retried_other_errors_are_not(tmp_path):
    from prefect.states import Failed

    scan = ArchivedScan("fresh", tmp_path)
    (tmp_path / "f_0.cbf").write_bytes(b"just written")
    settings = ScanSettings(output_dir=tmp_path / "out", n_workers=1)
    with pytest.raises(ScanNotSettled):
        reprocess_one_scan.fn(scan, settings, settle_s=3600, read_ahead=0, batch_size=4)
    assert _retry_if_unsettled(None, None, Failed(data=ScanNotSettled("still written")))
    assert not _retry_if_unsettled(None, None, Failed(data=ValueError("bad PONI")))
    assert reprocess_one_scan.retries == 2


def test_find_scans_takes_folders_and_eiger_masters_and_names_clashes_apart(tmp_path):
    import h5py

    (tmp_path / "a").mkdir()
    master = tmp_path / "b_master.h5"
    with h5py.File(tmp_path / "b_data_000001.h5", "w") as data:
        data["entry/data/data"] = np.zeros((1, 4, 4), np.uint16)
    with h5py.File(master, "w") as handle:
        handle["entry/data/data_000001"] = h5py.ExternalLink("b_data_000001.h5", "entry/data/data")
    scans = find_scans([tmp_path / "*"])
    assert [(s.scan_id, s.path.name) for s in scans] == [("a", "a"), ("b", "b_master.h5")]
    assert {p.name for p in scans[1].files()} == {"b_master.h5", "b_data_000001.h5"}
    with pytest.raises(ValueError, match="no scan matches"):
        find_scans([tmp_path / "missing*"])
    (tmp_path / "a.cbf").write_bytes(b"")
    clashing = find_scans([tmp_path / "a*"])
    assert [s.scan_id for s in clashing] == ["a", "a"]
    named = name_scans(clashing, ScanSettings(output_dir=tmp_path / "out"))
    assert named[0].scan_id == "a" and named[1].scan_id.startswith("a-")


def test_online_flow_stops_cleanly_on_sigterm_with_every_frame_taken_written(
    prefect_harness, tmp_path, reliability
):
    """SIGTERM (what Prefect's runner sends to cancel) to the flow's process: the frames
    already taken are written, the file is closed and readable, no child is left, and the
    summary says it was cancelled. The workers sit in their own sessions, so a signal to
    the flow's process group does not reach them. The run ends Cancelled, never Crashed,
    with the counts as its state's message and the stop in its log; the process (a plain
    Python caller of the flow) exits non-zero, raising :class:`ScanCancelled`."""
    incoming, out = tmp_path / "incoming", tmp_path / "out"
    incoming.mkdir()
    detector = SimulatedDetector(IntegrationConfig(), seed=4)
    frames = [exposure.frame for exposure in detector.scan("live", 6).exposures()]
    for number, frame in enumerate(frames[:4]):
        fabio.cbfimage.CbfImage(data=frame.astype(np.int32)).write(
            str(incoming / f"f_{number}.cbf")
        )
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from flows.online import SourceOptions, online_reconstruction
        from pipeline.config import InferenceConfig, ScanSettings
        expert = ScanSettings(n_workers=1, inference=InferenceConfig(n_samples=100))
        options = SourceOptions(idle_timeout_s=None, poll_interval_s=0.2)
        online_reconstruction(scan_id="live", source={str(incoming / "f_*.cbf")!r},
                              output_dir=Path({str(out)!r}), expert=expert,
                              source_options=options)
        """
    )
    env = {**os.environ, "PREFECT_API_URL": prefect_harness, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    path = out / "live.h5"
    deadline = time.monotonic() + 240
    written: set[int] = set()  # the complete rows in the file: acknowledged exposures
    while len(written) < 4 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
        try:
            from pipeline.store.results import written_indices

            written = written_indices(path) if path.exists() else set()
        except (OSError, KeyError, ValueError):
            written = set()
    assert len(written) == 4, process.communicate(timeout=30)[0][-3000:]
    os.killpg(process.pid, signal.SIGTERM)  # the whole group, as Prefect's runner does
    output = process.communicate(timeout=60)[0]
    counts = "4 exposures: 4 written, 0 failed, 0 flagged: cancelled, every frame taken was written"
    # the flow's caller gets the cancelled run's ScanCancelled: it exits non-zero, saying why
    assert process.returncode == 1 and f"ScanCancelled: {counts}" in output, output[-3000:]
    results = open_results(path)
    assert results.index.tolist() == [0, 1, 2, 3] and (results.status == "ok").all()
    with h5py.File(path, "r") as handle:  # the writer closed it: it added the NXcanSAS groups
        assert sorted(k for k in handle["entry"] if k.startswith("sasdata_")) == [
            f"sasdata_{i:06d}" for i in range(4)
        ]
    assert read_completion(path) is None  # cancelled: not marked complete, a rerun resumes
    assert "stopped on SIGTERM after writing every frame taken" in output, output[-3000:]
    from prefect.client.schemas.filters import FlowRunFilterName, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        named = FlowRunFilter(name=FlowRunFilterName(any_=["live"]))
        (run,) = [r for r in client.read_flow_runs(flow_run_filter=named) if str(out) in str(r)]
        history = [state.type.value for state in client.read_flow_run_states(run.id)]
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    # Cancelled, never Crashed (a crash automation would fire), with the counts; the stop is
    # in the run's log (the process ended normally, so its last log lines reached the API)
    assert run.state is not None and run.state.is_cancelled(), history
    assert run.state.message == counts and "CRASHED" not in history, history
    assert "stopped on SIGTERM after writing every frame taken" in [e.message for e in logs]
    leftover = subprocess.run(
        ["pgrep", "-f", f"--run-dir .*{tmp_path.name}"], capture_output=True, text=True
    ).stdout
    reliability.record(
        "fault",
        "SIGTERM (Prefect's cancel) to the online flow's process group mid-scan",
        tried=1,
        accepted=len(written),
        lost=reliability.check_every_acknowledged_once(written, results.index.tolist()),
        detail=f"the run ended {run.state.name}, never Crashed, the flow's process with return "
        f"code {process.returncode}, with {results.index.size} rows in the closed file, not "
        "marked complete; "
        f"{len(leftover.split())} child processes left",
    )
    assert not leftover.strip()


@pytest.mark.slow  # about 30 s: the default suite stays under 15 min
def test_train_and_validate_flows_write_a_model_its_card_and_artifacts(prefect_harness, tmp_path):
    from flows.model import train_model, validate_model
    from pipeline.model import Architecture, load
    from pipeline.model.train import TrainingConfig

    training = TrainingConfig(
        steps=6,
        batch_size=32,
        n_validation=64,
        validation_every=3,
        architecture=Architecture(n_blocks=2, hidden=16, condition_dim=8, condition_hidden=16),
    )
    state = train_model(tmp_path / "m.safetensors", training, return_state=True)
    result = state.result()
    model = load(Path(result["model"]), device="cpu")  # hash checked against the card
    assert model.card["training"]["flow"] == "train-model"
    assert result["history"]["step"] == [3, 6]
    artifacts = _artifacts(state.state_details.flow_run_id)
    assert artifacts["training-progress"][-1].data == 100.0
    assert "Calibration error" in artifacts["trained-model"][-1].data

    state = validate_model(
        Path(result["model"]), tmp_path / "v", simulations=20, reference=1, return_state=True
    )
    report = state.result()
    assert Path(report["report"]).is_file() and "calibration_error" in report["simulation"]
    artifacts = _artifacts(state.state_details.flow_run_id)
    assert artifacts["validation-progress"][-1].data == 100.0
    assert artifacts["validation-coverage"][-1].data.startswith("data:image/png;base64,")
    assert "C2ST" in artifacts["model-validation"][-1].data


def test_deployments_file_defines_the_online_flow_and_a_nightly_schedule(tmp_path):
    deployments = {d.name: d for d in load_deployments(REPO / "deploy" / "deployments.yaml")}
    assert sorted(deployments) == ["demo", "nightly", "online", "train", "validate"]
    assert deployments["online"].flow_name == "online-reconstruction"
    assert not deployments["online"].schedules  # started by operators from the UI
    nightly = deployments["nightly"]
    assert nightly.flow_name == "reprocess-scans"
    assert nightly.schedules[0].schedule.cron == "0 2 * * *"
    # each deployment (and so each of its runs) tagged with the project and its kind
    assert deployments["online"].tags == ["beamline-inn", "scan:online"]
    assert nightly.tags == ["beamline-inn", "scan:reprocess"]
    assert deployments["train"].tags == ["beamline-inn", "model:train"]
    beamline = tmp_path / "beamline.yaml"
    beamline.write_text(
        "beamline: ID13\ndemo:\n  name: d\n  tags: [tutorial]\n  parameters: {n_frames: 4}\n"
    )
    (demo,) = load_deployments(beamline)
    assert demo.tags == ["beamline-inn", "scan:demo", "beamline:ID13", "tutorial"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("online:\n  name: online\n  parameters:\n    source: {kind: camera}\n")
    with pytest.raises(ValueError, match="online"):
        load_deployments(bad)
    bad.write_text(  # the parameters of before the operator's form
        "nightly:\n  name: n\n  cron: '0 2 * * *'\n  parameters: {scans: [x], settings: {}}\n"
    )
    with pytest.raises(ValueError, match=r"nightly: .*settings"):
        load_deployments(bad)
    bad.write_text("nightly:\n  name: n\n  cron: 'every night'\n  parameters: {scans: [x]}\n")
    with pytest.raises(ValueError, match="nightly"):
        load_deployments(bad)


def test_serve_refuses_to_run_without_a_prefect_server(monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        status = main(["serve", str(REPO / "deploy" / "deployments.yaml")])
    assert status == 2 and "PREFECT_API_URL" in capsys.readouterr().err


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_dom(url: str, screenshot: Path | None = None) -> str:
    """The page's DOM after 20 s of (virtual) time in headless Chromium, its scripts run."""
    import tempfile

    options = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        "--window-size=1500,1100",
        "--virtual-time-budget=20000",
    ]
    with tempfile.TemporaryDirectory() as profile:
        options.append(f"--user-data-dir={profile}")
        if screenshot is not None:
            subprocess.run(
                [_chromium(), *options, f"--screenshot={screenshot}", url],
                capture_output=True,
                timeout=180,
                check=False,
            )
        return subprocess.run(
            [_chromium(), *options, "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        ).stdout


def _api(url: str, body: object | None = None, method: str | None = None) -> object:
    """One call to Prefect's REST API, retried as Prefect's own client retries it: the server
    answers 503 when its SQLite database was busy (``SQLITE_BUSY``: the transaction did not
    happen, so a retry is safe), which a loaded 2-core machine sees now and then."""
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    for delay_s in (1, 2, 4, 8, 16, None):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read()
            return json.loads(text) if text else None
        except urllib.error.HTTPError as error:
            if error.code not in (408, 429, 502, 503) or delay_s is None:
                raise
            time.sleep(delay_s)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """``prefect server start`` on loopback (what an operator runs); yields the environment
    that points a process at it (``PREFECT_API_URL``)."""
    from conftest import free_port, start_prefect_server

    server, env = start_prefect_server(tmp_path_factory.mktemp("prefect-server"), free_port())
    try:
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no Chromium (Debian package chromium)")
def test_prefect_ui_shows_a_demo_run_with_its_artifacts(prefect_server, tmp_path):
    """A Prefect server on loopback, the demo run against it, and the run's page in headless
    Chromium: the run and its artifacts appear. With BEAMLINE_INN_SCREENSHOT=DIR, the pages
    are also saved as PNGs there (docs/prefect-ui-*.png come from this)."""
    api = prefect_server["PREFECT_API_URL"]
    ui = api.removesuffix("/api")
    demo = subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--frames", "64", "--out", str(tmp_path)],
        env=prefect_server,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    runs = _api(f"{api}/flow_runs/filter", {"flow_runs": {"name": {"like_": ""}}})
    (run,) = [r for r in runs if str(tmp_path) in str(r["parameters"].get("output_dir", ""))]
    assert run["state_type"] == "COMPLETED"
    # searchable by its scan id (the results file's name), its counts in the state's message
    assert run["name"].startswith("sim-") and (tmp_path / f"{run['name']}.h5").exists()
    assert run["state"]["message"].startswith("64 exposures: 64 written, 0 failed")
    shots = (
        Path(os.environ["BEAMLINE_INN_SCREENSHOT"])
        if "BEAMLINE_INN_SCREENSHOT" in os.environ
        else None
    )
    page = f"{ui}/runs/flow-run/{run['id']}"
    dom = chromium_dom(page, shots / "prefect-ui-run.png" if shots else None)
    assert run["name"] in dom and "reconstruct-scan" in dom
    artifacts = _api(
        f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
    )
    latest = {a["key"]: a for a in sorted(artifacts, key=lambda a: a["created"])}
    scan = scan_key(run["name"])
    kinds = ("scan-summary", "recent-exposures", "scan-plots", "scan-progress")
    assert {f"{kind}-{scan}" for kind in kinds} <= set(latest)
    for key, expected in (
        ("recent-exposures", "pitch_nm median [5%, 95%]"),
        ("scan-plots", "data:image/png;base64,"),
        ("scan-summary", "Results:"),
    ):
        shot = shots / f"prefect-ui-{key}.png" if shots else None
        dom = chromium_dom(f"{ui}/artifacts/artifact/{latest[f'{key}-{scan}']['id']}", shot)
        assert expected in dom, (key, dom[-2000:])


@pytest.mark.slow
def test_served_online_deployment_runs_from_the_api_and_cancels_cleanly(
    prefect_server, tmp_path, reliability
):
    """``beamline-inn serve`` against a real server: the nightly deployment carries its cron
    schedule; a run of the online deployment (created as the UI's Run button does) takes the
    frames a detector writes, and cancelling it (as the UI's Cancel does) ends it Cancelled
    with every frame taken written and the file closed: never Crashed (no crash automation
    fires), the flow's Cancelled state with the counts, the stop in the run's log."""
    api = prefect_server["PREFECT_API_URL"]
    incoming, out = tmp_path / "incoming", tmp_path / "out"
    incoming.mkdir()
    frames = [
        e.frame for e in SimulatedDetector(IntegrationConfig(), seed=8).scan("x", 3).exposures()
    ]
    for number, frame in enumerate(frames):
        fabio.cbfimage.CbfImage(data=frame.astype(np.int32)).write(
            str(incoming / f"f_{number}.cbf")
        )
    deployments = tmp_path / "deployments.yaml"
    deployments.write_text(
        textwrap.dedent(
            f"""
            online:
              name: online-test
              parameters:
                scan_id: served
                source: "{incoming}/f_*.cbf"
                output_dir: {out}
                expert: {{n_workers: 1, inference: {{n_samples: 100}}}}
                source_options: {{idle_timeout_s: null, poll_interval_s: 0.2}}
            nightly:
              name: nightly-test
              cron: "30 3 * * *"
              parameters: {{scans: ["{tmp_path}/archive/*"], output_dir: {out}}}
            """
        )
    )
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", str(deployments)],
        env=prefect_server,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        found: dict = {}
        while len(found) < 2 and time.monotonic() < deadline:
            time.sleep(1)
            found = {d["name"]: d for d in _api(f"{api}/deployments/filter", {})}
        assert set(found) == {"online-test", "nightly-test"}, serve.stdout and serve.poll()
        assert found["nightly-test"]["schedules"][0]["schedule"]["cron"] == "30 3 * * *"
        run = _api(f"{api}/deployments/{found['online-test']['id']}/create_flow_run", {})
        path = out / "served.h5"
        from pipeline.store.results import written_indices

        written: set[int] = set()
        while len(written) < 3 and time.monotonic() < deadline + 240:
            time.sleep(1)
            with contextlib.suppress(OSError, KeyError, ValueError):  # not yet there
                written = written_indices(path) if path.exists() else set()
        assert written == {0, 1, 2}
        _api(
            f"{api}/flow_runs/{run['id']}/set_state",
            {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True},
        )
        # the runner sends SIGTERM; once the flow's process has ended, it records the run
        # Cancelled once more itself (its own message), then emits cancelled-flow-run
        names = ["prefect.flow-run.Crashed", "prefect.runner.cancelled-flow-run"]
        by_run = {"id": [f"prefect.flow-run.{run['id']}"]}
        events: list[str] = []
        while names[1] not in events and time.monotonic() < deadline + 360:
            time.sleep(1)
            page = _api(
                f"{api}/events/filter",
                {"filter": {"event": {"name": names}, "any_resource": by_run}, "limit": 50},
            )
            events = [event["event"] for event in page["events"]]
        states = sorted(
            _api(f"{api}/flow_run_states/?flow_run_id={run['id']}"), key=lambda s: s["timestamp"]
        )
        history = [s["type"] for s in states]
        # from Cancelling straight to Cancelled, never Crashed (no crash automation fires);
        # the flow's own Cancelled state has the counts
        assert history[-1] == "CANCELLED" and "CRASHED" not in history, history
        assert names[0] not in events, events
        counts = "3 exposures: 3 written, 0 failed, 0 flagged"
        cancelled = [s["message"] for s in states if s["type"] == "CANCELLED"]
        assert f"{counts}: cancelled, every frame taken was written" in cancelled, states
        logs = _api(
            f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200}
        )
        assert "stopped on SIGTERM after writing every frame taken" in [
            entry["message"] for entry in logs
        ]
        with h5py.File(path, "r") as handle:  # closed by the writer, NXcanSAS groups added
            assert sorted(k for k in handle["entry"] if k.startswith("sasdata_")) == [
                f"sasdata_{i:06d}" for i in range(3)
            ]
        artifacts = _api(
            f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
        )
        summary = [a for a in artifacts if a["key"].startswith("scan-summary")]
        assert summary and "Cancelled: every frame taken was written" in summary[-1]["data"]
        stored = open_results(path).index.tolist()
        reliability.record(
            "fault",
            "a served online deployment's run cancelled from the API (the UI's Cancel)",
            tried=1,
            accepted=len(written),
            lost=reliability.check_every_acknowledged_once(written, stored),
            detail=f"the run went {' -> '.join(history[-3:])}, never Crashed, with "
            f"{len(stored)} rows in the closed file; its summary artifact says every frame "
            "taken was written",
        )
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(60)


def _run_log_lines(
    flow_run_id, complete: Callable[[list[str]], bool], timeout_s: float = 30.0
) -> list[str]:
    """The messages of a flow run's log, once ``complete`` says they are all there (they
    reach the API in batches, every 2 s) or ``timeout_s`` passed."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200
            )
        lines = [entry.message for entry in logs]
        if complete(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)
