"""The scan monitor's rules (flows/monitor.py) against a stand-in Prefect that records every
call: artifact keys per scan, the progress current in place, artifact versions bounded, the
silent-feed events, and the run-log lines (failures, flags, the library's warnings)
rate-limited and never in the feeder's way. tests/test_orchestration.py runs it against a
real Prefect server."""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prefect.types.names import raise_on_name_alphanumeric_dashes_only

import flows.monitor
from flows.monitor import (
    EVENT_FEED_RESUMED,
    EVENT_FEED_SILENT,
    MonitorIntervals,
    ScanMonitor,
    scan_key,
)
from pipeline.config import SCAN_ID_PATTERN
from workers.feeder import RecentResult

QUANTILES = (
    (99.0, 39.0, 2.9, 1e4, 1.0),
    (100.0, 40.0, 3.0, 1e4, 1.0),
    (101.0, 41.0, 3.1, 1e4, 1.0),
)


def ok(index: int, z: float = 1.0) -> RecentResult:
    return RecentResult(index, "ok", 0.02, quantiles=QUANTILES, predictive_z=z)


def failed(index: int) -> RecentResult:
    return RecentResult(index, "failed", 0.01, error=f"frame f_{index}.cbf: not a detector frame")


@dataclass
class FakePrefect:
    """What the monitor sent: API calls by name (with their arguments), and the lines of the
    run's log."""

    calls: list[tuple[str, tuple, dict]] = field(default_factory=list)
    lines: list[tuple[int, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def recorder(self, name: str, returns: Callable[[], object] = lambda: None) -> Callable:
        def call(*args: object, **kwargs: object) -> object:
            with self.lock:
                self.calls.append((name, args, kwargs))
            return returns()

        return call

    def named(self, name: str) -> list[tuple[tuple, dict]]:
        with self.lock:
            return [(args, kwargs) for called, args, kwargs in self.calls if called == name]

    def events(self, name: str) -> list[dict]:
        return [
            kwargs["payload"] for _, kwargs in self.named("emit_event") if kwargs["event"] == name
        ]

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, ("timed out", self.calls)
            time.sleep(0.01)


@pytest.fixture
def prefect(monkeypatch) -> FakePrefect:
    """flows.monitor with every Prefect call replaced by a recorder (artifacts get fresh ids)."""
    fake = FakePrefect()
    run = type("Run", (), {"id": uuid.uuid4()})()
    monkeypatch.setattr(flows.monitor, "get_run_context", lambda: type("C", (), {"flow_run": run}))
    run_log = logging.Logger("fake-run-log")
    handler = logging.Handler()
    handler.emit = lambda record: fake.lines.append((record.levelno, record.getMessage()))  # type: ignore[method-assign]
    run_log.addHandler(handler)
    monkeypatch.setattr(flows.monitor, "get_run_logger", lambda: run_log)
    for name in (
        "create_progress_artifact",
        "create_table_artifact",
        "create_image_artifact",
        "create_markdown_artifact",
    ):
        monkeypatch.setattr(flows.monitor, name, fake.recorder(name, uuid.uuid4))
    for name in ("_update_artifact", "emit_event"):
        monkeypatch.setattr(flows.monitor, name, fake.recorder(name))
    monkeypatch.setattr(flows.monitor, "live_view_png", lambda *args, **kwargs: b"png")
    monkeypatch.setattr(flows.monitor, "latest_posterior", lambda path: None)
    return fake


def test_scan_keys_are_valid_artifact_keys_and_keep_scans_apart():
    """Ids of lower-case letters, digits and dashes are kept; any other is made valid and
    tagged with its hash, so ids that differ in case, ``_`` or ``.`` get keys of their own."""
    assert scan_key("sim-20261128-120000") == "sim-20261128-120000"
    ids = ["scan-1", "scan_1", "scan.1", "Scan-1", "SCAN_1", "scan1", "scan--1", "a" * 200]
    keys = [scan_key(scan_id) for scan_id in ids]
    assert len(set(keys)) == len(ids), keys
    for key in keys:
        assert raise_on_name_alphanumeric_dashes_only(key) == key  # Prefect's own check
    assert scan_key("Run_7.A").startswith("run-7-a-")
    assert scan_key("Run_7.A") == scan_key("Run_7.A")  # the same scan keeps its history


@settings(max_examples=300, deadline=None)
@given(st.lists(st.from_regex(SCAN_ID_PATTERN, fullmatch=True), min_size=2, max_size=5))
def test_every_scan_id_gets_a_valid_key_of_its_own(scan_ids):
    keys = {scan_id: scan_key(scan_id) for scan_id in scan_ids}
    assert all(raise_on_name_alphanumeric_dashes_only(key) == key for key in keys.values())
    assert len(set(keys.values())) == len(keys)


def test_monitor_keys_name_the_scan(prefect, tmp_path):
    monitor = ScanMonitor("Run_7.A", tmp_path / "x.h5", expected=1)
    monitor.record(ok(0))
    monitor.finish("# done")
    key = scan_key("Run_7.A")
    (_, kwargs), *_ = prefect.named("create_progress_artifact")
    assert kwargs["key"] == f"scan-progress-{key}"
    assert prefect.named("create_table_artifact")[0][1]["key"] == f"recent-exposures-{key}"
    assert prefect.named("create_image_artifact")[0][1]["key"] == f"scan-plots-{key}"
    assert prefect.named("create_markdown_artifact")[0][1]["key"] == f"scan-summary-{key}"


def test_progress_is_updated_in_place_with_the_counts_and_the_newest_exposure(prefect, tmp_path):
    """One progress artifact; its value and description follow the counts within a tick,
    and nothing is sent while they stay the same."""
    monitor = ScanMonitor("p", tmp_path / "x.h5", expected=10, intervals=MonitorIntervals(0.02))
    for result in (ok(0), failed(1), ok(2, z=80.0)):
        monitor.record(result)
    monitor.update(3, 3)
    text = "Scan p: 2 of 10 written, 1 failed, 1 flagged; newest exposure 2"
    updates = lambda: [  # noqa: E731
        args for args, _ in prefect.named("_update_artifact") if isinstance(args[1], float)
    ]
    prefect.wait_for(lambda: any(args[2] == text for args in updates()))
    assert updates()[-1][1] == 20.0  # percent written without failure
    sent = len(updates())
    time.sleep(0.2)  # ten ticks without a change
    assert len(updates()) == sent
    monitor.finish("# done")
    assert len(prefect.named("create_progress_artifact")) == 1
    assert prefect.named("create_progress_artifact")[0][1]["description"].endswith(
        "0 of 10 written, 0 failed, 0 flagged; no exposure yet"
    )


def test_table_and_plot_versions_stay_bounded_while_the_newest_is_kept_current(prefect, tmp_path):
    """A scan run 100 times faster than real (intervals scaled): the newest table and plot
    are updated in place often, new versions are made only once per version interval."""
    intervals = MonitorIntervals(table_s=0.01, plot_s=0.02, table_version_s=0.3, plot_version_s=0.6)
    monitor = ScanMonitor("bounded", tmp_path / "x.h5", intervals=intervals)
    started = time.monotonic()
    index = 0
    while (run_s := time.monotonic() - started) < 1.5:
        monitor.record(ok(index))
        monitor.update(index + 1, index + 1)
        index += 1
        time.sleep(0.002)
    monitor.finish("# done")
    versions = {kind: len(prefect.named(f"create_{kind}_artifact")) for kind in ("table", "image")}
    in_place = sum(isinstance(args[1], str) for args, _ in prefect.named("_update_artifact"))
    assert 2 <= versions["table"] <= 1 + math.ceil(run_s / 0.3), versions
    assert 1 <= versions["image"] <= 1 + math.ceil(run_s / 0.6), versions
    assert in_place >= 3 * sum(versions.values()), (in_place, versions)
    assert monitor.published["table_versions"] == versions["table"]
    assert monitor.published["plot_versions"] == versions["image"]
    # the last table sent, in place or as a new version, holds the newest exposure
    name, args, _ = [
        call
        for call in prefect.calls
        if call[0] == "create_table_artifact"
        or (call[0] == "_update_artifact" and '"exposure"' in str(call[1][1]))
    ][-1]
    newest = args[0][0] if name == "create_table_artifact" else json.loads(args[1])[0]
    assert newest["exposure"] == index - 1


def test_a_failed_in_place_update_makes_the_next_one_a_new_version(prefect, tmp_path, monkeypatch):
    """The newest version may be gone (deleted in the UI): after a failed update in place
    the next update creates a version."""
    failures = iter([ConnectionError("gone")])

    def update(artifact_id: object, data: object, description: str) -> None:
        if isinstance(data, str):  # the table's, not the progress
            prefect.recorder("update_table")(data)
            if error := next(failures, None):
                raise error

    monkeypatch.setattr(flows.monitor, "_update_artifact", update)
    intervals = MonitorIntervals(table_s=0.02, plot_s=100, table_version_s=100)
    monitor = ScanMonitor("gone", tmp_path / "x.h5", intervals=intervals)
    tables = ("create_table_artifact", "update_table")
    for index in range(3):
        monitor.record(failed(index))
        prefect.wait_for(lambda n=index: sum(len(prefect.named(name)) for name in tables) > n)
    monitor.finish("# done")
    sent = [name for name, *_ in prefect.calls if name in tables]
    assert sent[:3] == ["create_table_artifact", "update_table", "create_table_artifact"]


def test_a_silent_feed_is_announced_once_and_its_return_too(prefect, tmp_path):
    """No exposure submitted for ``feed_silent_s`` (from the start, too): one ``silent``
    event however long it lasts; ``resumed`` when exposures come again; silent again later."""
    intervals = MonitorIntervals(progress_s=0.02, feed_silent_s=0.2)
    monitor = ScanMonitor("quiet", tmp_path / "x.h5", intervals=intervals)
    silent = lambda: prefect.events(EVENT_FEED_SILENT)  # noqa: E731
    for _ in range(40):  # 0.8 s of updates without a new exposure, as an idle feed reports
        monitor.update(0, 0)
        time.sleep(0.02)
    assert len(silent()) == 1 and not prefect.events(EVENT_FEED_RESUMED)
    assert silent()[0]["submitted"] == 0 and silent()[0]["silent_s"] >= 0.2
    monitor.record(ok(0))
    monitor.update(1, 1)
    prefect.wait_for(lambda: prefect.events(EVENT_FEED_RESUMED))
    (resumed,) = prefect.events(EVENT_FEED_RESUMED)
    assert resumed["submitted"] == 1 and resumed["written"] == 1 and resumed["silent_s"] >= 0.6
    for _ in range(10):  # exposures coming: not silent
        monitor.update(1, 1 + _)
        time.sleep(0.02)
    assert len(silent()) == 1
    prefect.wait_for(lambda: len(silent()) == 2)
    monitor.finish("# done")
    assert len(silent()) == 2 and len(prefect.events(EVENT_FEED_RESUMED)) == 1
    lines = [text for _, text in prefect.lines]
    assert sum("no exposure submitted for" in text for text in lines) == 2
    assert any("exposures come again after" in text for text in lines)


def test_failures_and_flags_reach_the_run_log_in_one_line_per_interval_at_most(prefect, tmp_path):
    """40 failed and 20 flagged exposures in 0.6 s: one line per ``log_problems_s`` at most,
    each naming a few with their errors and counting them all."""
    intervals = MonitorIntervals(events_s=0.05, log_problems_s=0.25)
    monitor = ScanMonitor("bad", tmp_path / "x.h5", intervals=intervals)
    started = time.monotonic()
    for index in range(60):
        monitor.record(failed(index) if index % 3 else ok(index, z=50.0))
        time.sleep(0.01)
    run_s = time.monotonic() - started
    monitor.finish("# done")
    lines = [(level, text) for level, text in prefect.lines if "exposure" in text]
    assert 2 <= len(lines) <= 2 + math.ceil(run_s / 0.25), lines
    assert all(level == logging.WARNING for level, _ in lines)
    texts = " ".join(text for _, text in lines)
    assert sum(int(n) for n in re.findall(r"(\d+) exposures? failed", texts)) == 40
    assert sum(int(n) for n in re.findall(r"(\d+) (?:exposures? )?flagged", texts)) == 20
    first = lines[0][1]
    assert "failed: 1 (frame f_1.cbf: not a detector frame)" in first
    assert "flagged (not explained by a grating): 0 (z 50)" in first
    assert all(text.count("(frame f_") <= 5 for _, text in lines)
    assert any(" more" in text for _, text in lines)


def test_library_warnings_reach_the_run_log_rate_limited_until_the_scan_ends(prefect, tmp_path):
    """Warnings of ``pipeline``/``workers`` loggers (children too; not infos, not other
    libraries') are forwarded, at most 10 per window and then one line counting the rest;
    the handler is gone once the scan finished."""
    before = {name: list(logging.getLogger(name).handlers) for name in ("pipeline", "workers")}
    intervals = MonitorIntervals(events_s=0.05, log_window_s=0.5)
    monitor = ScanMonitor("noisy", tmp_path / "x.h5", intervals=intervals)
    library = logging.getLogger("pipeline.sources.watch")
    library.info("not forwarded: an info")
    logging.getLogger("somebody.else").warning("not forwarded: another library")

    def feeder() -> None:
        for number in range(25):
            logging.getLogger("workers.feeder").warning("worker %d replaced", number)

    thread = threading.Thread(target=feeder)
    thread.start()
    thread.join()
    library.error("file %s unreadable", "f_1.cbf")
    prefect.wait_for(lambda: any("not in this log" in text for _, text in prefect.lines))
    library.warning("in the next window")
    monitor.finish("# done")
    library.warning("after the scan: not forwarded")
    texts = [text for _, text in prefect.lines]
    forwarded = [text for text in texts if text.startswith(("workers.", "pipeline."))]
    assert len(forwarded) == 11 and forwarded[0] == "workers.feeder: worker 0 replaced"
    assert forwarded[-1] == "pipeline.sources.watch: in the next window"
    assert any(text.startswith("16 more warnings of pipeline/workers") for text in texts)
    assert not any("not forwarded" in text for text in texts)
    assert {name: logging.getLogger(name).handlers for name in before} == before


def test_forwarding_a_warning_never_waits_for_the_run_log(prefect, tmp_path, monkeypatch):
    """The run's log blocks (an API that hangs): the feeder's warnings still take
    microseconds each, as the handler only queues them; abandon() removes it at once."""
    run_log_free = threading.Event()
    slow = logging.Logger("slow-run-log")
    handler = logging.Handler()
    handler.emit = lambda record: run_log_free.wait(5)  # type: ignore[method-assign]
    slow.addHandler(handler)
    monkeypatch.setattr(flows.monitor, "get_run_logger", lambda: slow)
    monitor = ScanMonitor("slow", tmp_path / "x.h5", intervals=MonitorIntervals(events_s=0.02))
    library = logging.getLogger("workers.feeder")
    library.warning("the first: the monitor's thread now waits on the run log")
    time.sleep(0.1)
    started = time.perf_counter()
    for number in range(200):
        library.warning("warning %d", number)
    took_s = time.perf_counter() - started
    monitor.abandon()
    run_log_free.set()
    monitor.join()
    assert took_s < 0.1, took_s
    assert monitor._warnings not in logging.getLogger("workers").handlers


def test_the_summary_names_flagged_exposures_and_a_failed_scan_gets_its_counts(prefect, tmp_path):
    monitor = ScanMonitor("sum", tmp_path / "x.h5")
    for result in (ok(0), ok(1, z=81.0), failed(2)):
        monitor.record(result)
    monitor.finish("# Scan `sum` failed\n\nOSError: disk full", failed=True)
    ((text,), _) = prefect.named("create_markdown_artifact")[0]
    assert text.startswith("# Scan `sum` failed\n\nOSError: disk full\n\nBefore it stopped")
    assert "Before it stopped: 2 exposures written, 1 failed, 1 flagged." in text
    assert "- 2: frame f_2.cbf: not a detector frame" in text
    assert "- 1: posterior-predictive z 81.0" in text
    finished = [kw["event"] for _, kw in prefect.named("emit_event")]
    assert finished[-1] == "beamline-inn.scan.failed"


def test_scaled_intervals_keep_the_line_limit(tmp_path):
    scaled = MonitorIntervals().scaled(60)
    assert scaled.table_version_s == MonitorIntervals().table_version_s / 60
    assert scaled.feed_silent_s == 0.5 and scaled.log_lines_per_window == 10
