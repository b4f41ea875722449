"""The feeder's parts on their own, without its processes: integration, the supervisor's
bookkeeping, the remote work endpoint and the sockets (the ledger: test_feeder_ledger.py)."""

import shutil
import tempfile
from collections import namedtuple
from pathlib import Path

import zmq

from pipeline.config import PipelineConfig, TransportConfig
from pipeline.exposure import LineOut
from pipeline.sources import SimulatedDetector
from pipeline.store.lock import ResultsLock
from pipeline.transport import Endpoints
from pipeline.transport.messages import Credit, Hello, Ready, RemoteConfig, Reset, Stop, read
from workers.feeder.integration import Integration, Unusable
from workers.feeder.metrics import ScanMetrics
from workers.feeder.remote_work import RemoteWork
from workers.feeder.sockets import FeederSockets
from workers.feeder.supervisor import Supervisor, disk_space_note


def test_an_exposure_becomes_a_line_out_or_says_why_not(tmp_path):
    config = PipelineConfig(scan_id="parts", n_workers=1, output_dir=tmp_path)
    metrics = ScanMetrics()
    integration = Integration(config, metrics)
    good, short, unreadable = (
        SimulatedDetector(config.integration, seed=1).scan("parts", 3).exposures()
    )
    short.frame = short.frame[:100]
    unreadable.frame, unreadable.error = None, "truncated file: scan_00002.cbf"
    assert integration.place(good) is good and integration.skipped == 0  # a new file
    line_out = integration.line_out(good)
    assert isinstance(line_out, LineOut) and line_out.counts.shape == (config.grid.n_points,)
    failed = integration.line_out(short)
    assert isinstance(failed, Unusable) and failed.stage == "integration"
    assert "shape" in failed.error
    assert integration.line_out(unreadable) == Unusable("read", "truncated file: scan_00002.cbf")
    assert metrics.stages["integrated"].count == 1  # only what gave a line-out


def test_the_supervisor_knows_who_is_ready_before_any_process(tmp_path, monkeypatch):
    config = PipelineConfig(scan_id="supervised", n_workers=2, output_dir=tmp_path)
    supervisor = Supervisor(config, ResultsLock(config.output_path))
    assert supervisor.not_ready() == ["worker-0", "worker-1", "writer-0"]
    supervisor.mark_ready("writer-0", 11)
    supervisor.mark_ready("worker-1", 13)
    assert supervisor.not_ready() == ["worker-0"]
    assert not supervisor.is_child(13)  # started nothing: no child's word counts
    assert list(supervisor.lost_children(silent={13})) == [] and supervisor.children == []
    assert supervisor.log_dir == tmp_path / "logs" / "supervised"
    assert disk_space_note(tmp_path) == ""  # room enough
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(2**30, 2**30 - 2**20, 2**20))
    assert disk_space_note(tmp_path).startswith("the output file system is full (1.0 MiB free")


def _frames(socket: zmq.Socket) -> list[bytes]:
    assert socket.poll(5000), "nothing arrived"
    return socket.recv_multipart()


def test_a_remote_worker_is_greeted_once_reset_when_unknown_and_stopped():
    config = PipelineConfig(
        scan_id="greeted", n_workers=2, transport=TransportConfig(remote_work="tcp://127.0.0.1:*")
    )
    context = zmq.Context()
    work = context.socket(zmq.ROUTER)
    work.setsockopt(zmq.ROUTER_MANDATORY, 1)
    worker = context.socket(zmq.DEALER)
    remote = RemoteWork(config)
    try:
        remote.bind(context, work)
        assert remote.endpoint is not None and remote.endpoint.startswith("tcp://127.0.0.1:")
        worker.connect(remote.endpoint)
        worker.send_multipart(Hello(pid=1, host="gpu-node").to_frames())
        identity, *hello = _frames(work)
        assert isinstance(read(hello), Hello)
        remote.greet(identity)
        remote.greet(identity)  # a hello repeated: greeted once
        greeting = read(_frames(worker))
        assert isinstance(greeting, RemoteConfig) and greeting.worker_id == 2  # after local ones
        assert greeting.weights.size > 0 and worker.poll(200) == 0
        assert remote.greeted == (2,) and remote.greeted_as(identity, 2)
        assert not remote.greeted_as(identity, 0) and not remote.take_refusal()
        remote.join(Ready(role="worker", id=2, pid=1, credits=4, host="gpu-node"))
        assert remote.joined == 1
        remote.stop()  # the scan ended: it waits for the next
        assert isinstance(read(_frames(worker)), Stop)
        remote.reset(identity)  # dropped: it starts over with a hello
        assert isinstance(read(_frames(worker)), Reset) and remote.greeted == ()
        remote.reset(b"gone")  # no longer connected: nothing to send, no error
    finally:
        remote.close()
        worker.close(linger=0)
        work.close(linger=0)
        context.term()


def test_the_sockets_hand_on_messages_and_drop_malformed_ones(caplog):
    config = PipelineConfig(scan_id="sockets", n_workers=1)
    context = zmq.Context()
    folder = Path(tempfile.mkdtemp(prefix="binn-"))  # short: ipc paths are limited
    endpoints = Endpoints.resolve(config.transport, folder)
    sockets = FeederSockets(context, endpoints, config, key_refused=lambda: False)
    worker = context.socket(zmq.DEALER)
    writer = context.socket(zmq.PUSH)
    from_worker, from_writer = [], []
    try:
        worker.connect(endpoints.work)
        writer.connect(endpoints.acks)
        worker.send_multipart([b"not msgpack"])
        worker.send_multipart(Credit(id=0, credits=2).to_frames())
        writer.send_multipart(Ready(role="writer", id=0, pid=7).to_frames())
        acknowledged = 0
        for _ in range(50):
            acknowledged += sockets.service(
                100,
                from_worker=lambda identity, frames, message: from_worker.append(message),
                from_writer=lambda message: from_writer.append(message) or 1,
            )
            if len(from_worker) == 1 and len(from_writer) == 1 and sockets.malformed == 1:
                break
        assert [type(m) for m in from_worker] == [Credit] and from_worker[0].credits == 2
        assert [type(m) for m in from_writer] == [Ready] and acknowledged == 1
        assert sockets.malformed == 1 and "dropped a malformed message on work" in caplog.text
    finally:
        worker.close(linger=0)
        writer.close(linger=0)
        sockets.close()
        context.term()
        shutil.rmtree(folder)
