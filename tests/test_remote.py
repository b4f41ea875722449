"""Workers on other nodes: CURVE keys, ``beamline-inn worker --connect``, losing a remote
worker mid-scan, and the rules that keep plaintext endpoints on the machine."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from test_scan import _line_outs

from flows.cli import main
from pipeline.config import InferenceConfig, PipelineConfig, TransportConfig
from pipeline.store import open_results
from pipeline.transport.addresses import is_loopback
from pipeline.transport.security import create_keypair
from workers.feeder import Feeder, ScanError


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """A feeder's key pair, a worker's whose public key is authorized, and an intruder's."""
    folder = tmp_path_factory.mktemp("keys")
    for name in ("feeder", "gpu-node", "intruder", "impostor-feeder"):
        create_keypair(folder, name)
    (folder / "authorized").mkdir()
    (folder / "authorized" / "gpu-node.key").write_bytes((folder / "gpu-node.key").read_bytes())
    return folder


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config(scan_id: str, tmp_path: Path, keys: Path, url: str, n_workers: int, **transport):
    return PipelineConfig(
        scan_id=scan_id,
        n_workers=n_workers,
        output_dir=tmp_path,
        inference=InferenceConfig(n_samples=50),
        transport=TransportConfig(
            remote_work=url,
            curve_secret_key=keys / "feeder.key_secret",
            curve_authorized_keys=keys / "authorized",
            **transport,
        ),
    )


def _start_worker(url: str, key: Path, server_key: Path, log: Path, *extra: str):
    """``beamline-inn worker`` in its own process, its output in ``log``."""
    command = [sys.executable, "-m", "flows.cli", "worker", "--connect", url, "--threads", "1"]
    command += ["--key", str(key), "--server-key", str(server_key), *extra]
    with open(log, "w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_worker_with_its_key_serves_scan_after_scan_over_tcp(tmp_path, keys):
    url = f"tcp://127.0.0.1:{_free_port()}"
    log = tmp_path / "worker.log"
    worker = _start_worker(url, keys / "gpu-node.key_secret", keys / "feeder.key", log)
    try:
        for scan in ("remote-a", "remote-b"):  # the same worker, one scan after the other
            config = _config(scan, tmp_path, keys, url, n_workers=0)  # remote workers only
            with Feeder(config) as feeder:
                for exposure, line_out in _line_outs(60, seed=8):
                    feeder.submit_line_out(exposure, line_out)
                summary = feeder.wait()
            assert summary.remote_workers == 1 and summary.written_ok == 60
            assert summary.stages["inferred"]["count"] == 60
            results = open_results(config.output_path)
            assert sorted(results.index.tolist()) == list(range(60))
            assert (results.status == "ok").all()
        _wait_for(lambda: log.read_text().count("ended (stop)") == 2, 10, "the second stop")
        assert worker.poll() is None  # it waits for the next scan
    finally:
        worker.terminate()
        worker.wait(timeout=10)
    text = log.read_text()
    assert "scan remote-a as worker 0 on cpu" in text and "scan remote-b as worker 0" in text


def test_workers_with_a_wrong_key_are_refused(tmp_path, keys, reliability):
    url = f"tcp://127.0.0.1:{_free_port()}"
    intruders = {
        "unknown key": (keys / "intruder.key_secret", keys / "feeder.key"),
        "wrong feeder key": (keys / "gpu-node.key_secret", keys / "impostor-feeder.key"),
    }
    logs = {name: tmp_path / f"{name.replace(' ', '-')}.log" for name in intruders}
    processes = [_start_worker(url, *intruders[name], logs[name]) for name in intruders]
    try:
        config = _config("refused", tmp_path, keys, url, n_workers=1)
        with Feeder(config) as feeder:
            for log in logs.values():  # both try to connect while the scan runs
                _wait_for(lambda log=log: "waiting for a feeder" in log.read_text(), 60, "start")
            time.sleep(2.0)  # several hellos each
            for exposure, line_out in _line_outs(30, seed=9):
                feeder.submit_line_out(exposure, line_out)
            summary = feeder.wait()
        reliability.record(
            "security",
            "remote workers with an unknown key, or expecting another feeder's key",
            tried=len(intruders),
            accepted=feeder.n_done,
            lost=reliability.check_every_acknowledged_once(
                set(feeder.acknowledged), open_results(config.output_path).index.tolist()
            ),
            detail=f"{len(feeder.greeted_workers)} remote workers greeted, "
            f"{summary.remote_workers} took part; the local worker wrote "
            f"{summary.written_ok} of 30 exposures",
        )
        assert feeder.greeted_workers == ()  # no hello got through
        assert summary.remote_workers == 0 and summary.written_ok == 30
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
    for log in logs.values():
        assert " as worker " not in log.read_text()


def test_a_refused_key_is_named_on_both_sides(tmp_path, keys, caplog):
    """The worker whose key is not authorized exits 2 saying which key to authorize; the
    feeder logs the refusal with the worker's address; a worker that trusts another feeder
    key says once that the handshake fails, and retries."""
    import zmq

    from pipeline.transport.security import serve_curve, start_authenticator

    context = zmq.Context()
    authenticator = start_authenticator(context, keys / "authorized")
    feeder = context.socket(zmq.ROUTER)
    serve_curve(feeder, keys / "feeder.key_secret")
    url = f"tcp://127.0.0.1:{_free_port()}"
    feeder.bind(url)
    logs = {name: tmp_path / f"{name}.log" for name in ("intruder", "misled")}
    intruder = _start_worker(
        url, keys / "intruder.key_secret", keys / "feeder.key", logs["intruder"]
    )
    misled = _start_worker(
        url, keys / "gpu-node.key_secret", keys / "impostor-feeder.key", logs["misled"]
    )
    try:
        assert intruder.wait(timeout=60) == 2
        _wait_for(lambda: "(retrying)" in logs["misled"].read_text(), 60, "the misled worker")
        time.sleep(2.0)  # several more handshakes fail meanwhile
        assert misled.poll() is None
    finally:
        misled.terminate()
        misled.wait(timeout=10)
        authenticator.stop()
        feeder.close(linger=0)
        context.term()
    assert (
        f"beamline-inn worker: error: the feeder at {url} refused this worker's key (CURVE): is "
        "intruder.key in the feeder's --authorized-keys folder?" in logs["intruder"].read_text()
    )
    assert (
        logs["misled"]
        .read_text()
        .count(
            f"the handshake with the feeder at {url} failed: is --server-key "
            f"{keys / 'impostor-feeder.key'} the feeder's public key? (retrying)"
        )
        == 1
    )
    assert (
        f"refused a worker's key from 127.0.0.1 (CURVE: not in --authorized-keys "
        f"{keys / 'authorized'}" in caplog.text
    )
    assert authenticator.refused == 1
    assert authenticator.take_refusal() and not authenticator.take_refusal()


def test_a_remote_worker_killed_mid_scan_loses_no_exposure(tmp_path, keys, reliability):
    url = f"tcp://127.0.0.1:{_free_port()}"
    log = tmp_path / "worker.log"
    worker = _start_worker(url, keys / "gpu-node.key_secret", keys / "feeder.key", log)
    config = _config("remote-killed", tmp_path, keys, url, n_workers=1, worker_timeout_s=3.0)
    try:
        with Feeder(config) as feeder:
            _wait_for(lambda: feeder.collect() >= 0 and feeder.remote_workers == 1, 60, "join")
            line_outs = _line_outs(300, seed=10)
            for exposure, line_out in line_outs[:100]:
                feeder.submit_line_out(exposure, line_out)

            def remote_holding() -> frozenset[int]:  # sent to it, not yet written
                return next(w.holding for w in feeder.workers if w.remote)

            _wait_for(lambda: feeder.collect() >= 0 and remote_holding(), 30, "work for it")
            held = len(remote_holding())
            os.kill(worker.pid, signal.SIGKILL)
            for exposure, line_out in line_outs[100:]:
                feeder.submit_line_out(exposure, line_out)
            summary = feeder.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
    stored = open_results(config.output_path).index.tolist()
    reliability.record(
        "fault",
        "SIGKILL of a remote (CURVE, TCP) worker mid-scan",
        tried=1,
        accepted=feeder.n_done,
        lost=reliability.check_every_acknowledged_once(set(feeder.acknowledged), stored),
        detail=f"it held {held} exposures when killed; {summary.resent} resent (worker "
        f"timeout {config.transport.worker_timeout_s:g} s); {summary.written_ok} of "
        f"{len(line_outs)} written",
    )
    assert summary.remote_workers == 1 and summary.resent > 0 and summary.worker_restarts == 0
    assert summary.written_ok == 300
    assert sorted(stored) == list(range(300))


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("ipc:///tmp/x/work", True),
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.3.2.1:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://*:5555", False),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://10.0.0.7:5555", False),
        ("tcp://beamline-gpu-01:5555", False),
        ("tcp://eth0:5555", False),
    ],
)
def test_loopback_addresses(url, loopback):
    assert is_loopback(url) is loopback


def test_endpoints_that_leave_the_machine_need_curve(keys, reliability):
    insecure = [  # the fields of a transport configuration, what its refusal says
        ({"results": "tcp://*:6000"}, "would leave this machine"),
        ({"remote_work": "tcp://*:5555"}, "reachable from other hosts"),
        ({"remote_work": "tcp://*:5555", "curve_secret_key": keys / "feeder.key_secret"}, "both"),
    ]
    for fields, refusal in insecure:
        with pytest.raises(ValidationError, match=refusal):
            TransportConfig(**fields)
    with pytest.raises(ValidationError, match="no worker"):
        PipelineConfig(scan_id="x", n_workers=0)
    TransportConfig(remote_work="tcp://127.0.0.1:5555")  # loopback: keys optional
    secure = TransportConfig(
        remote_work="tcp://*:5555",
        curve_secret_key=keys / "feeder.key_secret",
        curve_authorized_keys=keys / "authorized",
    )
    assert PipelineConfig(scan_id="x", n_workers=0, transport=secure).n_workers == 0
    reliability.record(
        "security",
        "endpoints reachable from other hosts without CURVE keys, or with only half of them",
        tried=len(insecure),
        detail=f"all {len(insecure)} configurations refused; loopback without keys and "
        "a non-loopback endpoint with both keys accepted",
    )


def test_keys_command_writes_a_private_secret_and_never_overwrites(tmp_path, capsys):
    assert main(["keys", "--dir", str(tmp_path), "feeder", "node-1"]) == 0
    for name in ("feeder", "node-1"):
        assert (tmp_path / f"{name}.key_secret").stat().st_mode & 0o777 == 0o600
        assert "secret-key" not in (tmp_path / f"{name}.key").read_text()
    assert main(["keys", "--dir", str(tmp_path), "feeder"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_worker_command_refuses_plaintext_to_another_host(capsys):
    assert main(["worker", "--connect", "tcp://10.0.0.7:5555"]) == 2
    assert "not a loopback address" in capsys.readouterr().err


def test_a_feeder_with_an_empty_authorized_keys_folder_does_not_start(tmp_path, keys, reliability):
    (tmp_path / "nobody").mkdir()
    config = _config("no-keys", tmp_path, keys, "tcp://127.0.0.1:*", n_workers=1)
    config = config.model_copy(
        update={
            "transport": config.transport.model_copy(
                update={"curve_authorized_keys": tmp_path / "nobody"}
            )
        }
    )
    with pytest.raises(ValueError, match="no public key") as error:
        Feeder(config).start()
    reliability.record(
        "security",
        "a feeder with CURVE but an empty authorized-keys folder",
        tried=1,
        detail=f"it did not start: {type(error.value).__name__}: "
        f"{str(error.value).replace(str(tmp_path), '...')}",
    )


@pytest.mark.parametrize(
    ("unit", "environment", "command"),
    [
        ("beamline-inn-worker.service", "worker.env.example", "worker"),
        ("beamline-inn-online.service", "online.env.example", "online"),
        ("beamline-inn-serve.service", "serve.env.example", "serve"),
    ],
)
def test_systemd_units_run_commands_the_cli_accepts(unit, environment, command):
    import string

    from flows.cli import build_parser

    folder = Path(__file__).parents[1] / "deploy" / "systemd"
    lines = (folder / environment).read_text().splitlines()
    variables = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    text = (folder / unit).read_text()
    assert "EnvironmentFile=/etc/beamline-inn/" + environment.removesuffix(".example") in text
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    words = exec_start.removeprefix("ExecStart=").split()
    argv = [string.Template(word).substitute(variables) for word in words]
    assert argv[0].endswith("/bin/beamline-inn")
    args = build_parser().parse_args(argv[1:])
    assert args.command == command
    if command == "online":
        config = TransportConfig(
            remote_work=args.remote_work,
            curve_secret_key=args.curve_key,
            curve_authorized_keys=args.authorized_keys,
        )
        assert not is_loopback(config.remote_work)  # and accepted, because it has keys


def test_a_scan_that_waits_for_remote_workers_that_never_come_says_so(tmp_path):
    config = PipelineConfig(
        scan_id="nobody-came",
        n_workers=0,
        output_dir=tmp_path,
        transport=TransportConfig(
            remote_work="tcp://127.0.0.1:*", high_water_mark=2, result_timeout_s=2.0
        ),
    )
    with Feeder(config) as feeder, pytest.raises(ScanError, match="0 workers connected"):
        for exposure, line_out in _line_outs(5, seed=11):
            feeder.submit_line_out(exposure, line_out)
