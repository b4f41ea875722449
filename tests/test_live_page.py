"""The live scan page (pipeline.live): what it reads and shows, its alarms, its cost limits,
who may see it, and a live scan whose newest exposure shows while the feed is silent."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import bitshuffle
import fabio
import numpy as np
import pytest

from pipeline.config import InferenceConfig, IntegrationConfig, PipelineConfig
from pipeline.exposure import Exposure
from pipeline.live import (
    AlarmThresholds,
    LiveFigure,
    LivePage,
    LivePageSettings,
    LiveScanView,
    ScanCounts,
)
from pipeline.live.server import ENV_ADDRESS, ENV_TOKEN
from pipeline.physics import QGrid
from pipeline.sources import SimulatedDetector
from pipeline.sources.base import FrameCounts
from pipeline.sources.compression import EncodedFrame
from pipeline.sources.handoff import Handoff
from pipeline.store import ExposureResult, ResultsWriter

NAMES = ("pitch_nm", "width_nm", "sigma_nm", "n_photons", "background")
Q_NM = np.linspace(0.01, 0.4, 512)


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _row(index: int, status: str = "ok", z: float = 0.0, error: str = "") -> ExposureResult:
    if status != "ok":
        return ExposureResult(index, 0.0, status=status, error=error, source=f"f_{index}.cbf")
    quantiles = np.tile(np.array([[99.0], [100.0], [101.0]]), (1, len(NAMES))).astype(np.float32)
    return ExposureResult(
        index,
        0.0,
        source=f"f_{index}.cbf",
        counts=np.full(512, 10.0, np.float32),
        counts_sd=np.full(512, 3.0, np.float32),
        samples=np.full((4, len(NAMES)), 100.0, np.float32),
        mean=np.full(len(NAMES), 100.0, np.float32),
        sd=np.ones(len(NAMES), np.float32),
        quantiles=quantiles + index,
        predictive_z=z,
    )


@pytest.fixture
def writer(tmp_path) -> Iterator[ResultsWriter]:
    with ResultsWriter(tmp_path / "scan.h5", NAMES, ("nm",) * 3 + ("", ""), 4, Q_NM) as w:
        yield w


def test_the_view_reads_the_rows_added_since_it_last_looked_newest_first(writer):
    clock = Clock()
    view = LiveScanView("s", writer.path, poll_s=0.5, max_rows=3, clock=clock)
    assert view.state().rows == ()  # nothing written yet
    for index in range(5):
        writer.append(_row(index))
    clock.now += 0.1
    assert view.state().rows == ()  # looked 0.1 s ago: the same state (poll_s)
    clock.now += 0.5
    rows = view.state().rows
    assert [row.index for row in rows] == [4, 3, 2]
    assert rows[0].medians[0] == pytest.approx(104.0) and rows[0].intervals[0] == (103.0, 105.0)
    writer.append(_row(5, "failed", error="truncated file"))
    clock.now += 1
    state = view.state()
    assert [row.index for row in state.rows] == [5, 4, 3]
    assert (state.rows[0].error, state.rows[0].source) == ("truncated file", "f_5.cbf")
    index, quantiles, _ = view.traces()  # the failed exposure has no trace point
    assert index.tolist() == [0, 1, 2, 3, 4] and quantiles.shape == (5, 3, 3)
    assert json.dumps(state.to_json(), allow_nan=False)  # NaN (failed row) as null


def test_traces_stay_bounded_however_long_the_scan(writer):
    clock = Clock()
    view = LiveScanView("s", writer.path, max_points=50, clock=clock)
    for index in range(1000):
        writer.append(_row(index))
        if index % 97 == 0:
            clock.now += 1
            view.state()
    clock.now += 1
    view.state()
    index, _, _ = view.traces()
    assert 50 <= index.size <= 100
    steps = np.diff(index)
    assert steps.min() == steps.max()  # evenly thinned: every step-th row
    assert index[0] == 0 and index[-1] >= 1000 - 2 * steps[0]


def test_alarms_failing_flagging_stalled_and_feed_silent(writer):
    clock = Clock()
    thresholds = AlarmThresholds(recent_s=60, stalled_s=10, silent_s=30)
    view = LiveScanView("s", writer.path, live=True, thresholds=thresholds, clock=clock)
    counts = ScanCounts()
    view.follow(lambda: counts)
    assert view.state().alarms == ()
    counts = ScanCounts(taken=3, written=1, failed=1, flagged=1)
    writer.append(_row(0, z=9.0))
    writer.append(_row(1, "failed", error="bad"))
    clock.now += 1
    assert {a.name for a in view.state().alarms} == {"failing", "flagging"}
    clock.now += 15  # one taken, none written since
    assert {a.name for a in view.state().alarms} == {"failing", "flagging", "stalled"}
    counts = ScanCounts(taken=3, written=2, failed=1, flagged=1)
    writer.append(_row(2))
    clock.now += 20  # 36 s without a frame; failure and flag 35 s ago
    alarms = {a.name: a for a in view.state().alarms}
    assert set(alarms) == {"failing", "flagging", "feed silent"}
    assert alarms["failing"].level == "red" and alarms["feed silent"].level == "amber"
    clock.now += 60
    assert {a.name for a in view.state().alarms} == {"feed silent"}
    view.finish()
    assert view.state().alarms == ()  # an ended scan is neither silent nor stalled


def test_a_thumbnail_is_taken_only_when_the_page_wants_one(writer):
    clock = Clock()
    view = LiveScanView("s", writer.path, thumbnail_s=1.0, clock=clock)
    frame = np.arange(1000 * 600, dtype=np.int32).reshape(1000, 600)
    view.offer(Exposure("s", 0, 0.0, frame))
    thumbnail = view.thumbnail
    assert thumbnail is not None and thumbnail.index == 0
    image, stride = thumbnail.image()
    assert max(image.shape) <= 256 and image.shape == (1000 // stride, 600 // stride)
    # each pixel the brightest of its block of the frame's sampled pixels
    assert image[1, 1] == frame[2 * stride - thumbnail.stride, 2 * stride - thumbnail.stride]
    view.offer(Exposure("s", 1, 0.0, frame))
    assert view.thumbnail.index == 0  # not asked again yet
    view.state()
    view.offer(Exposure("s", 2, 0.0, frame))
    assert view.thumbnail.index == 0  # asked, but the last one is not a second old
    clock.now += 1.5
    view.state()
    view.offer(Exposure("s", 3, 0.0, frame))
    view.offer(Exposure("s", 4, 0.0, frame))
    assert view.thumbnail.index == 3


def test_a_frame_left_compressed_for_the_integrators_is_decoded_for_the_thumbnail(writer):
    clock = Clock()
    view = LiveScanView("s", writer.path, thumbnail_s=1.0, clock=clock)
    frame = np.arange(1000 * 600, dtype="<u4").reshape(1000, 600)
    blob = bitshuffle.compress_lz4(frame).tobytes()
    encoded = EncodedFrame(blob, frame.shape, "<u4", "bslz4", 4, "auto")
    view.offer(Exposure("s", 0, 0.0, None, encoded=encoded.with_data(blob[:-10])))
    assert view.thumbnail is None  # data that does not decode is the integrators' failure
    view.offer(Exposure("s", 1, 0.0, None, encoded=encoded))
    thumbnail = view.thumbnail
    assert thumbnail is not None and thumbnail.index == 1
    image, stride = thumbnail.image()
    assert image[1, 1] == frame[2 * stride - thumbnail.stride, 2 * stride - thumbnail.stride]


def test_the_figure_is_drawn_at_most_once_per_interval_and_only_when_new(writer):
    clock = Clock()
    view = LiveScanView("s", writer.path, poll_s=0.0, clock=clock)
    figure = LiveFigure(view, IntegrationConfig(), QGrid(), min_interval_s=1.0, clock=clock)
    detector = SimulatedDetector(IntegrationConfig(), seed=0)
    view.offer(next(iter(detector.scan("s", 1).exposures())))
    png = figure.png()
    assert png.startswith(b"\x89PNG") and figure.drawn == 1
    writer.append(_row(0))
    clock.now += 0.5
    assert figure.png() == png and figure.drawn == 1  # new row, but drawn 0.5 s ago
    clock.now += 0.6
    assert figure.png() != png and figure.drawn == 2
    clock.now += 5
    figure.png()
    assert figure.drawn == 2  # nothing new: not drawn again


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def test_a_page_other_machines_can_reach_needs_a_token(writer, monkeypatch):
    with pytest.raises(ValueError, match="give it a token"):
        LivePageSettings(host="0.0.0.0")
    monkeypatch.setenv(ENV_ADDRESS, "0.0.0.0:0")
    monkeypatch.delenv(ENV_TOKEN, raising=False)
    with pytest.raises(ValueError, match=ENV_TOKEN):
        LivePageSettings.from_environment()
    monkeypatch.setenv(ENV_ADDRESS, "127.0.0.1:0")
    monkeypatch.setenv(ENV_TOKEN, "s3cret")
    settings = LivePageSettings.from_environment()
    assert settings is not None
    view = LiveScanView("s", writer.path)
    with LivePage(view, LiveFigure(view, IntegrationConfig(), QGrid()), settings) as page:
        assert page.url.endswith("?token=s3cret")
        bare = page.url.partition("?")[0]
        for path in ("", "api/state", "figure.png"):
            assert _get(bare + path)[0] == 403
            assert _get(bare + path + "?token=wrong")[0] == 403
        status, body = _get(bare + "api/state?token=s3cret")
        assert status == 200 and json.loads(body)["scan_id"] == "s"
        status, body = _get(bare + "figure.png", {"Authorization": "Bearer s3cret"})
        assert status == 200 and body.startswith(b"\x89PNG")
        status, body = _get(page.url)
        assert status == 200 and b"Scan s" in body


class _Silent:
    """A source that gives ``frames`` exposures, then waits until stopped."""

    def __init__(self, frames: int, fail_with: Exception | None = None) -> None:
        self.frames, self.fail_with = frames, fail_with
        self.stopped = threading.Event()
        self.statistics = FrameCounts()

    def exposures(self) -> Iterator[Exposure]:
        for index in range(self.frames):
            yield Exposure("s", index, 0.0, np.zeros((2, 2)))
        if self.fail_with is not None:
            raise self.fail_with
        self.stopped.wait()

    def stop(self) -> None:
        self.stopped.set()

    @property
    def ended_cleanly(self) -> bool:
        return False


def test_the_handoff_waits_no_longer_than_asked_and_stops_its_source():
    source = _Silent(2)
    with Handoff(source) as frames:  # type: ignore[arg-type]
        taken = [frames.next(timeout_s=5).index, frames.next(timeout_s=5).index]
        started = time.monotonic()
        assert frames.next(timeout_s=0.2) is None and not frames.ended
        assert 0.15 < time.monotonic() - started < 2
    assert taken == [0, 1] and source.stopped.is_set()
    source = _Silent(1, fail_with=OSError("stream lost"))
    with Handoff(source) as frames, pytest.raises(OSError, match="stream lost"):  # type: ignore[arg-type]
        while not frames.ended:
            frames.next(timeout_s=1)


def test_a_live_scan_shows_its_newest_exposure_while_the_feed_is_silent(
    prefect_harness, tmp_path, monkeypatch
):
    """A watched folder gets 3 frames, then none for 8 s: the page shows the third within
    2 s of its write while the source still waits, and the scan's latency does not count
    the wait (before, the last exposure was acknowledged only when the next frame came)."""
    from flows.scan import reconstruct
    from pipeline.source_specs import WatchedFolder

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    detector = SimulatedDetector(IntegrationConfig(), seed=3)
    for exposure in detector.scan("live", 3).exposures():
        fabio.cbfimage.CbfImage(data=exposure.frame.astype(np.int32)).write(
            str(incoming / f"f_{exposure.index}.cbf")
        )
    config = PipelineConfig(
        scan_id="silent",
        output_dir=tmp_path / "out",
        n_workers=1,
        inference=InferenceConfig(n_samples=100),
        source=WatchedFolder(
            directory=incoming, pattern="f_*.cbf", idle_timeout_s=8.0, poll_interval_s=0.1
        ),
    )
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/"
    monkeypatch.setenv(ENV_ADDRESS, url.removeprefix("http://").rstrip("/"))
    found: dict[str, object] = {}

    def watch() -> None:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and "state" not in found:
            time.sleep(0.2)
            try:
                status, body = _get(url + "api/state")
            except urllib.error.URLError:  # not listening yet
                continue
            rows = json.loads(body)["rows"] if status == 200 else []
            if rows and rows[0]["index"] == 2:
                found["state"], found["seen_at"] = json.loads(body), time.time()

    watcher = threading.Thread(target=watch)
    watcher.start()
    summary = _run_flow(reconstruct, config)
    watcher.join()
    state = found["state"]
    assert isinstance(state, dict)
    newest = state["rows"][0]
    assert found["seen_at"] - newest["written_time"] < 2.0  # type: ignore[operator]
    assert summary.written_ok == 3
    assert summary.latency_p99_ms < 4000  # the 8 s of silence are not latency


def _run_flow(reconstruct, config: PipelineConfig):
    from prefect import flow

    @flow
    def live_scan():
        return reconstruct(config)

    return live_scan()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_pages_need_no_token(host):
    assert LivePageSettings(host=host).token is None


def test_the_page_reports_a_file_it_cannot_read(tmp_path):
    path = tmp_path / "scan.h5"
    path.write_bytes(b"not hdf5")
    view = LiveScanView("s", Path(path))
    assert view.state().rows == () and view.read_error


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium_run(url: str, what: str) -> str:
    """Headless Chromium on ``url`` for 4 s of (virtual) time, its scripts run: ``what`` is
    ``--dump-dom`` (the DOM is returned) or ``--screenshot=PATH``."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                str(_chromium()),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                f"--user-data-dir={profile}",
                "--window-size=1400,1500",
                "--virtual-time-budget=4000",
                what,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no Chromium (Debian package chromium)")
def test_the_live_page_of_a_demo_shows_its_newest_exposure_in_chromium(tmp_path):
    """``beamline-inn demo --frames 300`` against a Prefect server: while it runs, each look
    at the page shows an exposure at least as new as every one written 2 s before, and the
    page in headless Chromium shows the scan, its newest exposure and its figure. With
    BEAMLINE_INN_SCREENSHOT=DIR the page is saved as DIR/live-page.png (the one in
    docs/orchestration.md comes from this)."""
    import os
    import re
    import signal
    import subprocess
    import sys

    from conftest import free_port, start_prefect_server

    from pipeline.store.reader import rows_since

    server, env = start_prefect_server(tmp_path / "prefect", free_port())
    url = f"http://127.0.0.1:{free_port()}/"
    env = {**env, ENV_ADDRESS: url.removeprefix("http://").rstrip("/")}
    try:
        demo = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "demo", "--frames", "300", "--out", str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        looks, dom = [], []
        shots = os.environ.get("BEAMLINE_INN_SCREENSHOT")

        def browse() -> None:
            dom.append(_chromium_run(url, "--dump-dom"))
            if shots:
                _chromium_run(url, f"--screenshot={Path(shots) / 'live-page.png'}")

        browser = threading.Thread(target=browse)
        deadline = time.monotonic() + 400
        while demo.poll() is None and time.monotonic() < deadline:
            time.sleep(0.7)
            try:
                status, body = _get(url + "api/state")
            except urllib.error.URLError:  # not started yet, or ended
                continue
            looked_at = time.time()
            state = json.loads(body)
            if status != 200 or not state["rows"]:
                continue
            (path,) = tmp_path.glob("sim-*.h5")
            _, rows = rows_since(path, ("index", "written_time"))
            looks.append((looked_at, state["rows"][0]["index"], rows))
            if len(looks) == 2:  # Chromium beside the looks (it takes seconds to start)
                browser.start()
        output = demo.communicate(timeout=300)[0]
        browser.join(300)
        assert demo.returncode == 0, output[-3000:]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    assert "live page of scan sim-" in output and url in output
    assert len(looks) >= 3, output[-3000:]
    for looked_at, shown, rows in looks:  # rows in writing order
        (position,) = np.flatnonzero(rows["index"] == shown)
        written_2_s_before = np.flatnonzero(rows["written_time"] <= looked_at - 2.0)
        assert not written_2_s_before.size or position >= written_2_s_before[-1]
    (dom,) = dom
    match = re.search(r"newest exposure: (\d+) \(ok\)", dom)
    assert match and "Scan sim-" in dom and 'id="figure"' in dom, dom[-3000:]
    assert "taken" in dom and ("all well" in dom or "flagging" in dom), dom[-3000:]


def test_a_scan_whose_page_cannot_listen_runs_without_it(tmp_path, monkeypatch):
    """Its port taken (say, by another scan's page): a warning, and the scan goes on."""
    import logging
    import socket

    import flows.scan

    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    flows.scan.log.addHandler(handler)  # Prefect's logging setup can keep it from caplog
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            monkeypatch.setenv(ENV_ADDRESS, f"127.0.0.1:{taken.getsockname()[1]}")
            config = PipelineConfig(scan_id="busy", output_dir=tmp_path)
            view = LiveScanView("busy", config.output_path)
            with flows.scan.live_page(view, config):
                inside = True
    finally:
        flows.scan.log.removeHandler(handler)
    assert inside and any("scan busy runs without a live page" in w for w in warnings)
