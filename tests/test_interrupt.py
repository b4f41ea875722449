"""Ctrl-C and the Prefect API a command talks to: a command stops within seconds on Ctrl-C
with every acknowledged exposure kept, and a ``PREFECT_API_URL`` that does not answer stops
it before anything starts."""

from __future__ import annotations

import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest

from flows.api import PrefectAPIUnreachable, check_api
from flows.cli import main
from pipeline.integration import DEFAULT_PONI
from pipeline.store import open_results
from pipeline.store.results import read_completion, written_indices

REPO = Path(__file__).resolve().parents[1]
#: Nothing listens on the discard port of the loopback address.
DEAD_API = "http://127.0.0.1:9/api"
#: Ctrl-C must end a command within this many seconds ...
CTRL_C_S = 5.0
#: ... give or take the load of a shared 2-core machine (measured: 2-4 s)
SLACK_S = 3.0


def _pids(*arguments: str) -> list[int]:
    """The processes ``pgrep`` finds with ``arguments``."""
    found = subprocess.run(["pgrep", *arguments], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``: children, theirs, and so on."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:  # it has exited
        return ""


def _running(pid: int) -> bool:
    """Whether ``pid`` runs: it exists and is no zombie (an exited process whose parent, here
    a container's init that may not reap, has not collected it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _scan_folder(folder: Path, n_frames: int) -> Path:
    """``n_frames`` simulated CBF frames in ``folder``."""
    import fabio
    import numpy as np

    from pipeline.config import IntegrationConfig
    from pipeline.sources import SimulatedDetector

    folder.mkdir(parents=True)
    frames = SimulatedDetector(IntegrationConfig(), seed=3).scan(folder.name, n_frames).exposures()
    for number, exposure in enumerate(frames):
        image = fabio.cbfimage.CbfImage(data=exposure.frame.astype(np.int32))
        image.write(str(folder / f"f_{number:04d}.cbf"))
    return folder


#: Each command of a scan, as a terminal runs it, and what it says last after Ctrl-C.
CTRL_C_COMMANDS = {
    "demo": (["demo", "--frames", "400", "--workers", "1"], "stopped on Ctrl-C after"),
    # a wrapper that forwards SIGINT to its child (``timeout``) delivers it twice: one Ctrl-C
    "demo, SIGINT twice in 20 ms": (
        ["demo", "--frames", "400", "--workers", "1"],
        "stopped on Ctrl-C after",
    ),
    # the scan runs in a worker process of the local Dask cluster, a child of the command
    "reprocess-scans": (
        [
            "reprocess-scans",
            "scans/*",
            "--poni",
            str(DEFAULT_PONI),
            "--workers",
            "1",
            "--settle",
            "0",
        ],
        "stopped on Ctrl-C; run it again to resume the unfinished scans",
    ),
}


@pytest.mark.slow  # 35-70 s each: a 400-frame demo, a 160-frame scan; run by .ci/run
@pytest.mark.parametrize("command", CTRL_C_COMMANDS)
def test_ctrl_c_stops_a_scan_within_seconds_with_every_acknowledged_exposure_kept(
    command, tmp_path, reliability
):
    """SIGINT to the whole process group, as a terminal sends it, mid-scan, without
    ``PREFECT_API_URL``: the command stops its processes and exits with 130 within seconds,
    saying so without a traceback; every exposure in the file before the signal is still
    there, the file is closed and readable, and no process of the run is left (the local
    Prefect API server, in a session of its own, included)."""
    arguments, last_line = CTRL_C_COMMANDS[command]
    if command == "reprocess-scans":
        _scan_folder(tmp_path / "scans" / "sample", 160)
    out = tmp_path / "out"
    env = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(REPO)}
    env["PYTHONFAULTHANDLER"] = "1"  # a crash shows where
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *arguments, "--out", str(out)],
            env=env,
            cwd=tmp_path,
            start_new_session=True,  # a process group of its own, as a terminal gives a command
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    written: set[int] = set()
    deadline = time.monotonic() + 240
    try:
        while len(written) < 8 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
            for path in out.glob("*.h5"):
                try:
                    written = written_indices(path)
                except (OSError, KeyError, ValueError):  # still being created
                    written = set()
        assert len(written) >= 8, stderr_path.read_text()[-3000:]
        # the local Prefect API server, out of the command's process group; the writer and
        # the worker (their run folder names the feeder: the command, or a Dask worker)
        server = _pids("-P", str(process.pid), "-f", "prefect.server.api.server:create_app")
        assert len(server) == 1 and os.getpgid(server[0]) != process.pid
        below = _descendants(process.pid)
        scan = [pid for pid in below if re.search(r"workers[.].*binn-", _command_line(pid))]
        assert len(scan) == 2
        before_signal = len(stderr_path.read_text().splitlines())
        sent = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        if "twice" in command:
            time.sleep(0.02)
            os.killpg(process.pid, signal.SIGINT)
        process.wait(60)
        took_s = time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    after_signal = stderr_path.read_text().splitlines()[before_signal:]
    (path,) = out.glob("*.h5")
    results = open_results(path)
    stored = results.index.tolist()
    assert process.returncode == 130, after_signal
    assert last_line in after_signal[-1]
    if command.startswith("demo"):
        assert f"after {len(stored)} exposures were written to" in after_signal[-1]
    assert not any("Traceback" in line for line in after_signal), after_signal
    # Prefect's crash lines for the runs (two per flow or task run), and ours
    assert len(after_signal) <= 12, after_signal
    assert written <= set(stored) and len(set(stored)) == len(stored)
    assert (results.status == "ok").all()
    with h5py.File(path, "r") as handle:  # the writer closed it: it added the NXcanSAS groups
        groups = sum(key.startswith("sasdata_") for key in handle["entry"])
    assert groups == len(stored), "\n".join(p.read_text() for p in out.glob("logs/*/*.log"))
    assert read_completion(path) is None  # not marked complete: reprocessing resumes it
    left = [pid for pid in [*server, *below] if _running(pid)]
    reliability.record(
        "fault",
        f"SIGINT (Ctrl-C) to the process group of `{command}` mid-scan, Prefect on a local server",
        tried=1,
        accepted=len(written),
        **reliability.tally(path, written),
        detail=f"exit code {process.returncode} after {took_s:.1f} s, {len(after_signal)} "
        f"lines on stderr after the signal, {len(stored)} rows in the closed file; "
        f"{len(left)} processes left",
    )
    assert not left, [_command_line(pid) for pid in left]
    assert took_s < CTRL_C_S + SLACK_S


def test_a_prefect_api_url_that_does_not_answer_stops_the_command_before_it_starts(tmp_path):
    """One line on stderr, exit code 2, within seconds, and no results file."""
    out = tmp_path / "out"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--frames", "4", "--out", str(out)],
        env={**os.environ, "PREFECT_API_URL": DEAD_API, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    took_s = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"beamline-inn demo: error: the Prefect API at {DEAD_API} does not answer ([Errno 111] "
        "Connection refused): start it (prefect server start) or unset PREFECT_API_URL"
    ]
    assert not out.exists()
    assert took_s < 10, took_s


@pytest.mark.parametrize(
    "arguments",
    [
        ["reprocess", "f_*.cbf", "--poni", str(DEFAULT_PONI)],
        ["reprocess-scans", "scan_*", "--poni", str(DEFAULT_PONI)],
        ["online", "--watch", ".", "--poni", str(DEFAULT_PONI)],
        ["serve", str(REPO / "deploy" / "deployments.yaml")],
    ],
    ids=lambda arguments: arguments[0],
)
def test_every_command_that_runs_flows_checks_the_prefect_api_first(arguments, tmp_path, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if arguments[0] != "serve":
        arguments = [*arguments, "--out", str(tmp_path / "out")]
    with temporary_settings(updates={PREFECT_API_URL: DEAD_API}):
        assert main(arguments) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"beamline-inn {arguments[0]}: error: the Prefect API at {DEAD_API}")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def http_status() -> Iterator[tuple[str, list[int]]]:
    """A loopback HTTP server that answers every GET with the status in the list it yields
    (200 at first); yields its base URL and that list."""
    status = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status[0])
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", status
    finally:
        server.shutdown()
        server.server_close()


def test_check_api_takes_any_answer_but_a_404(http_status):
    url, status = http_status
    check_api(f"{url}/api")
    status[0] = 401  # an API that refuses the key: Prefect explains that later
    check_api(f"{url}/api")
    status[0] = 404  # a web server, but no Prefect API (the URL lacks /api, say)
    with pytest.raises(PrefectAPIUnreachable, match=r"no Prefect API .* HTTP 404"):
        check_api(url)
    with pytest.raises(PrefectAPIUnreachable, match="does not answer"):
        check_api(DEAD_API, timeout_s=1.0)
