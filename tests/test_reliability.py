"""Faults and hostile input that the other test files do not inject: a full disk, the flow
process and the read-ahead reader killed mid-scan; and the security properties: no pickle,
results confined to the output directory. Every test records what it tried in the
reliability report (``pytest -m reliability --reliability-report=docs/reliability.md``)."""

from __future__ import annotations

import ast
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_scan import _line_outs, _running

from pipeline.config import InferenceConfig, PipelineConfig, scan_id_from
from pipeline.store import open_results
from workers.feeder import Feeder, ScanError

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_filesystem(tmp_path) -> Iterator[Path]:
    """A 3 MiB tmpfs at a fresh folder (mounting needs root, as on the build machine)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a size-limited file system here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_scan_with_every_acknowledged_exposure_kept(
    small_filesystem, reliability
):
    config = PipelineConfig(
        scan_id="disk-full",
        n_workers=1,
        output_dir=small_filesystem,
        inference=InferenceConfig(n_samples=1000),  # 20 kB per exposure: full after ~100
    )
    line_outs = _line_outs(400, seed=21)
    acknowledged: set[int] = set()
    with (
        pytest.raises(ScanError, match="writer exited") as error,
        Feeder(config, on_result=lambda result: acknowledged.add(result.index)) as feeder,
    ):
        for exposure, line_out in line_outs:
            feeder.submit_line_out(exposure, line_out)
        feeder.wait()
    assert "output file system is full" in str(error.value)  # the log may not say: same disk
    partial = open_results(config.output_path)  # opens as the last flush left it
    stored = partial.index.tolist()
    lost = reliability.check_every_acknowledged_once(acknowledged, stored)
    record = reliability.record(
        "fault",
        "output file system full during a scan (3 MiB tmpfs), then space freed and resumed",
        tried=1,
        accepted=len(acknowledged),
        lost=lost,
    )
    assert 20 < len(acknowledged) < 400 and lost == 0

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_filesystem)], check=True)
    with Feeder(config, resume=True) as feeder:
        for exposure, line_out in line_outs:  # the whole scan again
            feeder.submit_line_out(exposure, line_out)
        summary = feeder.wait()
    results = open_results(config.output_path)
    assert results.index.tolist() == list(range(400)) and (results.status == "ok").all()
    kept = sorted(acknowledged)
    np.testing.assert_array_equal(
        results.samples[kept], partial.samples[np.searchsorted(partial.index, kept)]
    )
    record.detail = (
        f"the scan stopped with ScanError naming the full disk; {len(stored)} rows in the "
        f"file; resumed: {summary.skipped} kept, {summary.written_ok} computed, 400 of 400"
    )


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children of children too)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def _stored(path: Path) -> list[int]:
    try:
        return open_results(path).index.tolist()
    except (OSError, KeyError, ValueError):  # not created yet, or its datasets not yet there
        return []


def _write_frames(folder: Path, n: int) -> None:
    import fabio

    folder.mkdir()
    rng = np.random.default_rng(8)
    for number in range(n):
        frame = rng.poisson(20.0, (48, 64)).astype(np.int32)
        fabio.edfimage.EdfImage(data=frame).write(str(folder / f"frame_{number:04d}.edf"))


@pytest.mark.slow  # about 50 s: the default suite stays under 15 min
def test_the_flow_process_and_the_reader_killed_mid_scan_lose_nothing_written(
    prefect_harness, tmp_path, reliability, small_detector
):
    """``beamline-inn reprocess`` (the flow process: source, integrator, feeder) killed with
    SIGKILL; resumed, its read-ahead reader killed; resumed again, it completes the scan."""
    _write_frames(tmp_path / "frames", 300)
    poni, model = small_detector.poni, small_detector.model
    out = tmp_path / "out"
    path = out / "killed-flow.h5"
    command = [
        sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())",
        "reprocess", str(tmp_path / "frames" / "frame_*.edf"), "--poni", str(poni),
        "--full-ring", "--out", str(out), "--scan-id", "killed-flow", "--workers", "1",
        "--model", str(model),
    ]  # fmt: skip
    environment = {**os.environ, "PREFECT_API_URL": prefect_harness}

    def run(*options: str, kill_at_rows: int, victim: str) -> tuple[list[int], str, int]:
        """Start the command; once the file holds ``kill_at_rows`` rows, SIGKILL the flow
        process or its reader; return the rows seen then, the output and the exit code."""
        log = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}.log"
        with open(log, "w") as output:
            process = subprocess.Popen(
                [*command, *options], env=environment, stdout=output, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + 240
            while len(seen := _stored(path)) < kill_at_rows:
                assert process.poll() is None, f"ended before the kill:\n{log.read_text()}"
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            below = _descendants(process.pid)
            if victim == "flow":
                os.kill(process.pid, signal.SIGKILL)
            else:
                (reader,) = [p for p in below if b"spawn_main" in _cmdline(p)]
                os.kill(reader, signal.SIGKILL)
            code = process.wait(120)
        finally:
            if process.poll() is None:
                process.kill()
        deadline = time.monotonic() + 30
        while any(_running(pid) for pid in below) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_running(pid) for pid in below), "processes outlived the flow"
        return seen, log.read_text(), code

    seen_first, _, code = run(kill_at_rows=30, victim="flow")
    after_first = open_results(path)
    lost_first = reliability.check_every_acknowledged_once(
        set(seen_first), after_first.index.tolist()
    )
    reliability.record(
        "fault",
        "SIGKILL of the flow process (source, integrator, feeder) mid-scan",
        tried=1,
        accepted=len(seen_first),
        lost=lost_first,
        detail=f"exit {code}; its writer, workers and reader exited; "
        f"{after_first.index.size} rows in the file",
    )
    seen_second, printed, code = run(
        "--resume", kill_at_rows=after_first.index.size + 60, victim="reader"
    )
    assert code != 0 and "reader" in printed.lower(), printed
    after_second = open_results(path)
    lost_second = reliability.check_every_acknowledged_once(
        set(seen_first) | set(seen_second), after_second.index.tolist()
    )
    reliability.record(
        "fault",
        "SIGKILL of the read-ahead reader process mid-scan (a resumed run)",
        tried=1,
        accepted=len(seen_second),
        lost=lost_second,
        detail=f"the flow failed naming the reader; {after_second.index.size} rows in the file",
    )
    done = subprocess.run(
        [*command, "--resume"], env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = open_results(path)
    assert results.index.tolist() == list(range(300)) and (results.status == "ok").all()
    kept = sorted(seen_second)
    np.testing.assert_array_equal(
        results.samples[kept], after_second.samples[np.searchsorted(after_second.index, kept)]
    )
    assert lost_first == lost_second == 0


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# Security: no pickle, confined output paths


#: Modules that unpickle (or run code from) what they read.
PICKLING_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}


def _pickle_uses(path: Path) -> list[str]:
    """Lines of ``path`` that import a pickling module, call ``torch.load``, ``np.load``
    without ``allow_pickle=False``, ``yaml.load`` or ``yaml.unsafe_load``, or ``read_pickle``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(REPOSITORY)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            found += [f"{where} imports {n}" for n in names if n.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            name = node.func.attr
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if (owner, name) == ("torch", "load") or name in ("read_pickle", "unsafe_load"):
                found.append(f"{where} calls {owner}.{name}")
            elif owner in ("np", "numpy") and name == "load":
                if keywords.get("allow_pickle") != "False":
                    found.append(f"{where} calls {owner}.load without allow_pickle=False")
            elif (owner, name) == ("yaml", "load") and "SafeLoader" not in keywords.get(
                "Loader", ""
            ):
                found.append(f"{where} calls yaml.load without SafeLoader")
    return found


def test_no_pickle_in_the_code_that_reads_messages_files_models_or_configs(reliability):
    sources = [
        path
        for package in ("pipeline", "workers", "flows", "benchmarks")
        for path in sorted((REPOSITORY / package).rglob("*.py"))
    ]
    uses = [use for path in sources for use in _pickle_uses(path)]
    reliability.record(
        "security",
        "static check: no pickling module, torch.load, np.load without allow_pickle=False, "
        "unsafe yaml.load",
        tried=len(sources),
        detail=f"{len(sources)} source files of pipeline/, workers/, flows/, benchmarks/",
    )
    assert not uses, uses
    # the check itself finds what it looks for
    probe = REPOSITORY / "tests" / "_pickle_probe.py"
    try:
        probe.write_text(
            "import pickle\nimport numpy as np\nnp.load('x')\nimport torch\ntorch.load('m')\n"
        )
        assert len(_pickle_uses(probe)) == 3
    finally:
        probe.unlink()


class _Trap:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_payloads_are_refused_without_being_unpickled(tmp_path, reliability):
    import hashlib
    import json
    import shutil

    from pipeline.bundled import DEFAULT_MODEL
    from pipeline.model import load
    from pipeline.model_card import ModelFileError, card_path
    from pipeline.transport import ProtocolError, decode

    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Trap(marker))
    with pytest.raises(ProtocolError):
        decode([payload])
    with pytest.raises(ProtocolError):
        decode([payload, payload])
    weights = tmp_path / "model.safetensors"  # a pickled "checkpoint" under the model's name
    weights.write_bytes(payload)
    shutil.copy(card_path(DEFAULT_MODEL), card_path(weights))
    with pytest.raises(ModelFileError, match="SHA-256"):
        load(weights, device="cpu")
    card = json.loads(card_path(weights).read_text())  # a card that vouches for the pickle
    card["weights_sha256"] = hashlib.sha256(payload).hexdigest()
    card_path(weights).write_text(json.dumps(card))
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        load(weights, device="cpu")
    assert not marker.exists()
    reliability.record(
        "security",
        "pickled payloads as wire messages (1 and 2 parts) and as model weights (with a bad "
        "hash, and with a card vouching for it)",
        tried=4,
        detail="each refused with an error; the payload's code never ran",
    )


HOSTILE_SCAN_IDS = [
    "../outside", "../../etc/passwd", "/etc/passwd", "a/b", "..", ".", "", ".hidden",
    "x\x00y", "a\\b", "a b", "-rf", "ü", "x" * 201, "scan\n", "~root",
]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE_SCAN_IDS)
def test_a_scan_id_that_would_leave_the_output_directory_is_refused(tmp_path, name):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="scan_id"):
        PipelineConfig(scan_id=name, output_dir=tmp_path)


def test_results_and_logs_stay_in_the_output_directory_whatever_the_names(tmp_path, reliability):
    """Scan ids made from file and folder names (archived scans, Eiger masters) and hostile
    ids given directly: the results file and log folder are always inside ``output_dir``."""
    output_dir = (tmp_path / "results").resolve()
    made = [scan_id_from(name) for name in [*HOSTILE_SCAN_IDS, "../x_master", "scan 12/ä"]]
    for scan_id in made:
        config = PipelineConfig(scan_id=scan_id, output_dir=output_dir)
        assert config.output_path.resolve().parent == output_dir
        assert (output_dir / "logs" / config.scan_id).resolve().parent == output_dir / "logs"
    refused = 0
    for name in HOSTILE_SCAN_IDS:
        try:
            PipelineConfig(scan_id=name, output_dir=output_dir)
        except ValueError:
            refused += 1
    reliability.record(
        "security",
        "scan ids that would leave the output directory (.., /, NUL, 201 characters, ...)",
        tried=len(HOSTILE_SCAN_IDS) + len(made),
        detail=f"{refused} of {len(HOSTILE_SCAN_IDS)} given directly refused; "
        f"{len(made)} made from file names all inside the output directory",
    )
    assert refused == len(HOSTILE_SCAN_IDS)


# Load: a soak run at the highest rate the pipeline accepts

SOAK = """
import json, os, sys, time
from dataclasses import replace
from pathlib import Path
from pipeline.config import PipelineConfig
from pipeline.sources import SimulatedDetector
from workers.feeder import Feeder

duration_s, output_dir = float(sys.argv[1]), Path(sys.argv[2])
config = PipelineConfig(scan_id="soak", output_dir=output_dir)  # the defaults: 2 workers
pool = list(SimulatedDetector(config.integration, seed=1).scan("soak", 12).exposures())
with Feeder(config) as feeder:
    print(json.dumps({"feeder": os.getpid(), **feeder.children}), flush=True)
    start, index = time.monotonic(), 0
    while time.monotonic() - start < duration_s:  # as fast as the pipeline takes them
        feeder.submit(replace(pool[index % len(pool)], index=index, timestamp=time.time()))
        index += 1
    summary = feeder.wait()
print(json.dumps({"submitted": summary.submitted, "written_ok": summary.written_ok,
                  "wall_s": time.monotonic() - start}), flush=True)
"""


def _process_state(pid: int) -> dict[str, float]:
    """Resident memory (MiB), threads, open file descriptors and sockets of ``pid``."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    links = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            links.append(os.readlink(fd))
        except OSError:  # closed meanwhile
            continue
    return {
        "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
        "threads": int(status["Threads"]),
        "fds": len(links),
        "sockets": sum(link.startswith("socket:") for link in links),
    }


@pytest.mark.slow
def test_a_soak_run_keeps_memory_descriptors_sockets_and_threads_flat(tmp_path, reliability):
    """``BEAMLINE_INN_SOAK_S`` seconds (default 120) of simulated Eiger 4M frames handed over
    as fast as the pipeline takes them; every process sampled every 5 s."""
    import json

    duration_s = float(os.environ.get("BEAMLINE_INN_SOAK_S", "120"))
    process = subprocess.Popen(
        [sys.executable, "-c", SOAK, str(duration_s), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    samples: dict[int, list[dict[str, float]]] = {}
    times: list[float] = []
    try:
        processes = json.loads(process.stdout.readline())
        pids = list(processes.values())
        start = time.monotonic()
        while time.monotonic() - start < duration_s - 2:
            times.append(time.monotonic() - start)
            for pid in pids:
                samples.setdefault(pid, []).append(_process_state(pid))
            time.sleep(5)
        summary = json.loads(process.stdout.readline())
        assert process.wait(300) == 0
    finally:
        if process.poll() is None:
            process.kill()
    stored = open_results(tmp_path / "soak.h5").index.tolist()
    lost = reliability.check_every_acknowledged_once(set(range(summary["written_ok"])), stored)
    names = list(processes)
    settled = [i for i, t in enumerate(times) if t >= min(60.0, duration_s / 4)]  # warmed up
    growth = {}
    for name, pid in zip(names, pids, strict=True):
        series = {key: [samples[pid][i][key] for i in settled] for key in samples[pid][0]}
        third = max(1, len(settled) // 3)
        growth[name] = {
            "rss_mib": float(np.median(series["rss_mib"][-third:]))
            - float(np.median(series["rss_mib"][:third])),
            **{key: max(series[key]) - min(series[key]) for key in ("threads", "fds", "sockets")},
        }
    rate = summary["written_ok"] / summary["wall_s"]
    between = rate * (times[settled[-1]] - times[settled[0]]) * 2 / 3  # exposures, third to third
    reliability.record(
        "load",
        f"soak: {duration_s:.0f} s of Eiger 4M frames as fast as accepted, 2 workers",
        tried=summary["submitted"],
        accepted=summary["written_ok"],
        lost=lost,
        detail=f"{rate:.1f} exposures/s; after warm-up, resident memory change (MiB, last "
        "third vs first) and spread of threads/fds/sockets per process: "
        + "; ".join(
            f"{name} {g['rss_mib']:+.1f} MiB, {g['threads']:.0f}/{g['fds']:.0f}/{g['sockets']:.0f}"
            for name, g in growth.items()
        ),
    )
    (tmp_path / "soak-samples.json").write_text(json.dumps({"times": times, "samples": samples}))
    assert summary["written_ok"] == summary["submitted"] == len(stored) and lost == 0
    for name, g in growth.items():
        assert g["rss_mib"] < 8 + between / 1024, (name, g)  # 8 MiB of noise + 1 KiB/exposure
        assert g["threads"] == 0 and g["fds"] <= 2 and g["sockets"] == 0, (name, g)


# The Prefect API gone during an online run


@pytest.mark.slow
def test_an_online_run_goes_on_writing_while_the_prefect_api_is_unreachable(
    tmp_path, reliability, small_detector
):
    """``beamline-inn online`` watching a folder against a Prefect server that is stopped
    mid-run and started again: every frame is written, and the log says when the API
    answers again."""
    import fabio
    from conftest import free_port, start_prefect_server

    poni, model = small_detector.poni, small_detector.model
    incoming, out, home = tmp_path / "incoming", tmp_path / "out", tmp_path / "prefect"
    incoming.mkdir()
    port = free_port()
    server, environment = start_prefect_server(home, port)
    rng = np.random.default_rng(9)
    written = 0

    def write_frames(n: int, interval_s: float) -> None:
        nonlocal written
        for _ in range(n):
            frame = rng.poisson(20.0, (48, 64)).astype(np.int32)
            fabio.edfimage.EdfImage(data=frame).write(str(incoming / f"frame_{written:04d}.edf"))
            written += 1
            time.sleep(interval_s)

    command = [
        sys.executable, "-m", "flows.cli", "online", "--watch", str(incoming),
        "--pattern", "frame_*.edf", "--idle-timeout", "20", "--poni", str(poni), "--full-ring",
        "--out", str(out), "--scan-id", "api-outage", "--workers", "1", "--samples", "100",
        "--model", str(model),
    ]  # fmt: skip
    log = tmp_path / "online.log"
    with open(log, "w") as output:
        online = subprocess.Popen(command, env=environment, stdout=output, stderr=output)
    path = out / "api-outage.h5"
    try:
        deadline = time.monotonic() + 240
        while not path.exists():
            assert online.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        write_frames(20, 0.1)
        while len(_stored(path)) < 20:
            assert online.poll() is None, log.read_text()
            time.sleep(0.2)
        before_outage = _stored(path)
        os.killpg(server.pid, signal.SIGTERM)  # the API goes away
        server.wait(60)
        write_frames(40, 0.25)
        deadline = time.monotonic() + 60
        while len(_stored(path)) < 60 and time.monotonic() < deadline:
            time.sleep(0.2)
        during_outage = len(_stored(path)) - len(before_outage)
        server, _ = start_prefect_server(home, port)  # and comes back
        write_frames(20, 0.25)
        code = online.wait(240)
    finally:
        if online.poll() is None:
            online.kill()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    printed = log.read_text()
    stored = open_results(path).index.tolist()
    lost = reliability.check_every_acknowledged_once(set(range(written)), stored)
    reliability.record(
        "fault",
        "Prefect API unreachable for part of an online run (server stopped, started again)",
        tried=1,
        accepted=len(stored),
        lost=lost,
        detail=f"{during_outage} of 40 frames written while the API was down; exit {code}; "
        f"the log: {next((line for line in printed.splitlines() if 'answers again' in line), '')}",
    )
    assert code == 0, printed
    assert stored == list(range(80)) and lost == 0
    assert during_outage == 40, printed  # the pipeline did not wait for the API
    assert "Prefect API answers again" in printed, printed


def test_an_update_held_up_by_the_prefect_client_s_retries_is_logged(
    prefect_harness, tmp_path, monkeypatch, monitor_warnings
):
    """Prefect's client retries a lost connection for about a minute: a shorter outage is
    one slow update, which the log reports once the API answers."""
    from prefect import flow

    import flows.monitor
    from flows.monitor import MonitorIntervals, ScanMonitor
    from workers.feeder import RecentResult

    monkeypatch.setattr(flows.monitor, "SLOW_UPDATE_S", 0.2)
    monkeypatch.setattr(flows.monitor, "create_table_artifact", lambda *a, **k: time.sleep(0.3))

    @flow
    def scan() -> None:
        monitor = ScanMonitor(
            "held-up", tmp_path / "none.h5", intervals=MonitorIntervals(10, 0.05, 10, 10)
        )
        monitor.record(RecentResult(0, "failed", 0.0, error="x"))
        time.sleep(0.5)
        monitor.finish("# done")

    scan()
    assert any("answers again: an update (table) took 0 s" in m for m in monitor_warnings), (
        monitor_warnings
    )
