"""Shared fixtures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261128)


#: Small real detector files (``../shared/data`` beside the repository), absent on some machines.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The shared real-data folder; the test is skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real detector files not available ({SHARED_DATA} absent)")
    return SHARED_DATA


#: A 48 x 64 detector of 75 um pixels 0.2 m from the sample, beam in its middle (v1 PONI: no
#: detector name, so the shape comes from the frames).
SMALL_DETECTOR_PONI = """PixelSize1: 7.5e-05
PixelSize2: 7.5e-05
Distance: 0.2
Poni1: 0.0018
Poni2: 0.0024
Rot1: 0
Rot2: 0
Rot3: 0
Wavelength: 1.55e-10
"""


def geometry_model(
    path: Path, integration, grid, name: str = "geometry", description: str = ""
) -> Path:
    """A tiny untrained model (one coupling block of 8 units) for the geometry of
    ``integration`` (an :class:`~pipeline.config.IntegrationConfig` whose detector shape is
    known) on ``grid`` (a :class:`~pipeline.physics.QGrid`), written to ``path`` with its card:
    for tests about something else than the model that scan another geometry than the default
    model's instrument. Its instrument is derived from the geometry as pyFAI's engine counts
    its pixels (:attr:`LineOutIntegrator.pixels_per_bin`): bins without a pixel masked,
    background weights the pixels over their mean over the observed bins (rounded, then
    renormalised)."""
    from pipeline.instrument import Instrument
    from pipeline.integration import LineOutIntegrator
    from pipeline.model import Architecture, PosteriorModel, save

    pixels = LineOutIntegrator(integration, grid).pixels_per_bin
    observed = pixels > 0
    weights = np.round(pixels / pixels[observed].mean(), 4)
    weights = np.where(observed, weights / weights[observed].mean(), 0.0)
    instrument = Instrument(
        name=name,
        description=description or f"derived for tests from {integration.poni}",
        q_min_nm=grid.q_min_nm,
        q_max_nm=grid.q_max_nm,
        n_points=grid.n_points,
        resolution_nm=grid.resolution_nm,
        azimuth_range_deg=integration.azimuth_range_deg,
        masked_bins=tuple(int(i) for i in np.flatnonzero(~observed)),
        pixels_per_bin=tuple(int(n) for n in pixels),
        background_weights=tuple(float(w) for w in weights),
        poni=Path(integration.poni).read_text() if integration.poni else None,
    )
    architecture = Architecture(n_blocks=1, hidden=8, condition_dim=4, condition_hidden=8)
    return save(PosteriorModel(architecture, instrument), path, name=name)


@dataclass(frozen=True)
class SmallDetector:
    """:data:`SMALL_DETECTOR_PONI` in a file, and a model for it (full ring, a 64-bin grid
    from q 0.02 to 0.5 1/nm: the default grid has bins its few pixels miss)."""

    poni: Path
    model: Path


@pytest.fixture(scope="session")
def small_detector(tmp_path_factory) -> SmallDetector:
    """The small detector's PONI and a tiny untrained model that matches it (full ring)."""
    from pipeline.config import IntegrationConfig
    from pipeline.physics import QGrid

    folder = tmp_path_factory.mktemp("small-detector")
    poni = folder / "small.poni"
    poni.write_text(SMALL_DETECTOR_PONI)
    integration = IntegrationConfig(poni=poni, azimuth_range_deg=None, detector_shape=(48, 64))
    grid = QGrid(q_min_nm=0.02, q_max_nm=0.5, n_points=64, resolution_nm=3e-3)
    model = geometry_model(folder / "small-detector.safetensors", integration, grid, "small")
    return SmallDetector(poni, model)


def free_port() -> int:
    """A loopback TCP port that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class EigerSimulator:
    """ALBA's ``eiger-simulator`` (PyPI), a third-party DECTRIS detector: SIMPLON REST API on
    ``http``, stream v1 on ``stream``, replaying ``frames`` (48 x 64, uint16)."""

    http: str
    stream: str
    frames: np.ndarray
    log: Path

    API = "/detector/api/1.6.0"

    def request(self, path: str, value: object = None, method: str = "PUT") -> object:
        body = None if value is None else json.dumps({"value": value}).encode()
        request = urllib.request.Request(
            self.http + path, data=body, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=20.0) as response:
            text = response.read()
        return json.loads(text) if text else None

    def configure(self, n_images: int, compression: str, count_time_s: float = 0.001) -> None:
        """Set up a series of ``n_images`` (compression ``bslz4`` or ``lz4``) and initialise."""
        for name, value in (
            ("x_pixels_in_detector", 64), ("y_pixels_in_detector", 48), ("nimages", n_images),
            ("count_time", count_time_s), ("compression", compression),
        ):  # fmt: skip
            self.request(f"{self.API}/config/{name}", value)
        self.request("/stream/api/1.6.0/config/header_detail", "all")
        self.request(f"{self.API}/command/initialize")

    def arm(self) -> int:
        """Arm the detector (it sends the series header); return the series id."""
        return self.request(f"{self.API}/command/arm")["sequence id"]

    def trigger_in_background(self) -> tuple[threading.Thread, list[BaseException]]:
        """Trigger the series from a thread (the call returns when all images are sent)."""
        failures: list[BaseException] = []

        def trigger() -> None:
            try:
                self.request(f"{self.API}/command/trigger")
            except BaseException as error:
                failures.append(error)

        thread = threading.Thread(target=trigger, daemon=True)
        thread.start()
        return thread, failures


@pytest.fixture(scope="module")
def eiger_simulator(tmp_path_factory) -> Iterator[EigerSimulator]:
    """A running ``eiger-simulator`` on free loopback ports (skipped where it is not installed)."""
    try:
        import eigersim.web  # noqa: F401  (needs fastapi, bitshuffle and the system liblz4)
    except Exception as error:  # only where the test extra is missing
        pytest.skip(f"eiger-simulator is not usable here: {error!r}")
    folder = tmp_path_factory.mktemp("eigersim")
    rng = np.random.default_rng(7)
    frames = rng.poisson(20.0, (7, 48, 64)).astype(np.uint16)
    frames[:, 10:20, 30:40] = np.arange(7, dtype=np.uint16)[:, None, None] * 1000
    with h5py.File(folder / "series_master.h5", "w") as file:
        file.create_dataset("entry/data/data_000001", data=frames)
    http_port, zmq_port = free_port(), free_port()
    log = folder / "simulator.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "eigersim.server", "--host", "127.0.0.1",
                "--port", str(http_port), "--zmq", f"tcp://127.0.0.1:{zmq_port}",
                "--dataset", str(folder / "series_master.h5"), "--log-level", "warning",
            ],
            cwd=folder, stdout=log_file, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    simulator = EigerSimulator(
        f"http://127.0.0.1:{http_port}", f"tcp://127.0.0.1:{zmq_port}", frames, log
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                simulator.request("/detector/api/version/", method="GET")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"eiger-simulator did not start:\n{log.read_text(errors='replace')}"
                    )
                time.sleep(0.2)
        yield simulator
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture
def monitor_warnings() -> Iterator[list[str]]:
    """The warnings the UI monitor (``flows.monitor``) logs during the test, read by a handler
    on its own logger: Prefect's logging setup can keep them from pytest's ``caplog``."""
    import logging

    import flows.monitor

    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    flows.monitor.log.addHandler(handler)
    try:
        yield messages
    finally:
        flows.monitor.log.removeHandler(handler)


def start_prefect_server(home: Path, port: int) -> tuple[subprocess.Popen, dict[str, str]]:
    """``prefect server start`` on loopback (what an operator runs), in a session of its own,
    once its API answers; returns the process and the environment that points a process at
    it (``PREFECT_API_URL``). Stop it with ``os.killpg(process.pid, signal.SIGTERM)``."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    prefect = Path(sys.executable).parent / "prefect"
    server = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(env["PREFECT_API_URL"] + "/health", timeout=30):
                return server, env
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise
            time.sleep(1)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory) -> Iterator[str]:
    """A temporary Prefect server for the whole session (it takes 15-60 s to start here);
    yields its API URL."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield str(PREFECT_API_URL.value())


# The reliability report: every test that takes the ``reliability`` fixture is marked
# ``reliability``; ``pytest -m reliability --reliability-report=docs/reliability.md`` runs them
# (fast and slow) and writes what each injected, how often, and what was lost.

AREAS = ("fault", "bad input", "hostile message", "fuzzing", "load", "security")


@dataclass
class ReliabilityRecord:
    """What one test tried: ``tried`` injections or inputs, ``accepted`` exposures acknowledged
    before (or around) the fault, ``lost`` of those missing or duplicated afterwards; where
    the test counts them apart (:meth:`Reliability.tally`), ``lost`` is the missing ones,
    ``doubled`` the exposures or frames stored twice and ``mixed`` the rows made with another
    configuration or model than their file's."""

    test: str
    area: str
    what: str
    tried: int = 0
    accepted: int | None = None
    lost: int | None = None
    detail: str = ""
    doubled: int | None = None
    mixed: int | None = None


class Reliability:
    """The ``reliability`` fixture: ``record(...)`` one fault or input kind per call."""

    def __init__(self, test: str, records: list[ReliabilityRecord]) -> None:
        self.test, self._records = test, records

    def record(self, area: str, what: str, **fields: object) -> ReliabilityRecord:
        assert area in AREAS, area
        entry = ReliabilityRecord(self.test, area, what, **fields)  # type: ignore[arg-type]
        self._records.append(entry)
        return entry

    def check_every_acknowledged_once(self, acknowledged: set[int], stored: list[int]) -> int:
        """The number of exposures lost or duplicated: acknowledged ones missing from the
        file plus indices stored more than once."""
        return len(acknowledged - set(stored)) + len(stored) - len(set(stored))

    def tally(self, path: Path, acknowledged: set[int]) -> dict[str, int]:
        """``lost``, ``doubled`` and ``mixed`` of the results file at ``path`` (read with plain
        h5py): exposures of ``acknowledged`` missing; exposure indices, and frames of files
        (by identity), stored more than once; rows whose processing key is not the file's."""
        from pipeline.provenance import ProcessingRecord
        from pipeline.sources.identity import FrameId

        with h5py.File(path, "r", locking=False) as handle:
            entry = handle["entry"]
            index = entry["exposures/index"][()]
            written = index >= 0
            identities = [FrameId.parse(f.decode()) for f in entry["exposures/frame_id"][written]]
            frames = [frame.location for frame in identities if frame is not None]
            keys = entry["exposures/processing_key"][()][written]
            theirs = ProcessingRecord.from_json(entry["processing"][()].decode()).key
        stored = index[written].tolist()
        return {
            "lost": len(acknowledged - set(stored)),
            "doubled": len(stored) - len(set(stored)) + len(frames) - len(set(frames)),
            "mixed": int(np.count_nonzero(keys != theirs.encode())),
        }


_RELIABILITY_RECORDS: list[ReliabilityRecord] = []
_RELIABILITY_OUTCOMES: dict[str, tuple[str, str, float]] = {}


@pytest.fixture
def reliability(request) -> Reliability:
    return Reliability(request.node.nodeid, _RELIABILITY_RECORDS)


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--reliability-report",
        metavar="PATH",
        # give it as --reliability-report=PATH: pytest reads a separate PATH of an option it
        # does not know yet (this file defines it) as a test path, and then misses this file
        help="write the reliability report (markdown) of the tests that ran to PATH",
    )


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if "reliability" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.reliability)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if "reliability" not in getattr(item, "fixturenames", ()):
        return
    if report.when == "call" or report.outcome != "passed":
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        elif report.failed and call.excinfo is not None:
            told = str(call.excinfo.value).strip().splitlines()
            reason = f"{call.excinfo.typename}: {told[0] if told else ''}"[:200]
        previous = _RELIABILITY_OUTCOMES.get(item.nodeid, ("passed", "", 0.0))
        if previous[0] == "passed":  # the first failure or skip of a test is the one told
            _RELIABILITY_OUTCOMES[item.nodeid] = (report.outcome, reason, report.duration)


def pytest_sessionfinish(session) -> None:
    path = session.config.getoption("--reliability-report")
    if path and _RELIABILITY_OUTCOMES:
        from reliability_report import write_report

        write_report(Path(path), _RELIABILITY_RECORDS, _RELIABILITY_OUTCOMES)


def nexus_validation_problems(path: Path) -> list[str]:
    """What pynxtools' validator (``pynx validate``, as a user runs it) reports against a
    NeXus file: its warning and error lines, and its verdict when that is not "valid"."""
    validator = Path(sys.executable).with_name("pynx")
    report = subprocess.run(
        [str(validator), "validate", str(path)], capture_output=True, text=True, timeout=600
    )
    lines = (report.stdout + report.stderr).splitlines()
    problems = [line for line in lines if line.startswith(("WARNING", "ERROR"))]
    if not lines or not lines[-1].endswith(
        "is valid according to the `NXcanSAS` application definition."
    ):
        problems.append(lines[-1] if lines else f"no verdict (exit code {report.returncode})")
    return problems
