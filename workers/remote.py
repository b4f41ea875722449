"""Inference worker on another node: ``beamline-inn worker --connect tcp://FEEDER:5555``.

It connects a DEALER socket to a feeder's ``transport.remote_work`` endpoint (CURVE: its own
key pair and the feeder's public key, :mod:`pipeline.transport.security`) and says ``hello``
until a feeder answers with its scan's configuration and model. The model travels with the
configuration, so every worker of a scan uses the same weights (checked against the card's
SHA-256). It then serves line-outs as a local worker does (:class:`InferenceSession`:
credits, batches within the latency budget), but sends the results back over the same socket
and the feeder hands them to its writer, so a feeder opens one port and nothing else.

At the end of a scan (``stop``), or when the feeder no longer knows it (``reset``: the
connection dropped and came back, or the feeder gave up waiting for it), it says hello again
and waits for the next scan; with ``once`` it returns after one scan.

A feeder that refuses the worker's key (CURVE: its public key is not in the feeder's
authorized-keys folder) is told by ZeroMQ's socket monitor (the handshake failed,
authentication): :meth:`RemoteWorker.serve` raises :class:`FeederRefusedError`, which names
the key to authorize, instead of waiting for a feeder for ever. A handshake that fails
otherwise (the worker was given another feeder's public key) is said once, and retried.

Liveness both ways: ZeroMQ's own heartbeats (ZMTP PING/PONG every
``transport.heartbeat_interval_s``, answered by ZeroMQ's I/O thread even while the feeder is
waiting for a detector) drop a connection whose peer is gone, and the worker's own heartbeats
while idle tell the feeder that the worker is not stalled.
"""

from __future__ import annotations

import contextlib
import os
import socket as network
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from pipeline.config import PipelineConfig
from pipeline.model import load
from pipeline.model.allocator import retain_freed_memory
from pipeline.model.posterior import CountsSampler
from pipeline.transport import ProtocolError
from pipeline.transport.addresses import is_loopback
from pipeline.transport.messages import (
    Credit,
    FrameMessage,
    Heartbeat,
    Hello,
    LineOutMessage,
    Ready,
    RemoteConfig,
    Reset,
    Stop,
    WireMessage,
    read,
)
from pipeline.transport.security import connect_curve
from workers.inference import InferenceSession, compile_if_asked

#: Seconds between hellos while no feeder answers, and between ZMTP heartbeats.
HELLO_INTERVAL_S = 1.0
#: A connection silent for this long is dropped (and ZeroMQ reconnects).
CONNECTION_TIMEOUT_S = 10.0
#: The socket monitor's events that tell how a handshake with the feeder went (ZeroMQ 4.3).
HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class FeederRefusedError(ConnectionRefusedError):
    """The feeder refused this worker's key (CURVE): it is not among its authorized keys."""


class RemoteWorker:
    """A worker connected to ``connect`` that serves one scan after another.

    Args:
        connect: the feeder's ``remote_work`` address as seen from this node,
            e.g. ``tcp://feeder-host:5555``.
        secret_key: this worker's ``.key_secret`` file; needed unless ``connect`` is loopback.
        server_key: the feeder's public ``.key`` file (with ``secret_key``).
        threads: torch threads (``None``: one per core of this node).
        device: torch device, ``auto``: CUDA when present.
        log: where progress lines go.
    """

    def __init__(
        self,
        connect: str,
        secret_key: Path | None = None,
        server_key: Path | None = None,
        threads: int | None = None,
        device: str = "auto",
        log: Callable[[str], None] = print,
    ) -> None:
        if (secret_key is None) != (server_key is None):
            raise ValueError("CURVE needs both this worker's secret key and the feeder's key")
        if secret_key is None and not is_loopback(connect):
            raise ValueError(
                f"{connect} is not a loopback address: pass this worker's secret key and the "
                "feeder's public key (beamline-inn keys)"
            )
        self.connect = connect
        self.secret_key = secret_key
        self.server_key = server_key
        self.device = device
        self.log = log
        torch.set_num_threads(threads or os.cpu_count() or 1)
        retain_freed_memory()
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        for option, value in (
            (zmq.LINGER, 1000),
            (zmq.IMMEDIATE, 1),  # nothing queues for a feeder that is not connected
            (zmq.SNDHWM, 0),  # both directions are bounded by the credits
            (zmq.RCVHWM, 0),
            (zmq.SNDTIMEO, int(1000 * CONNECTION_TIMEOUT_S)),
            (zmq.HEARTBEAT_IVL, int(1000 * HELLO_INTERVAL_S)),
            (zmq.HEARTBEAT_TIMEOUT, int(1000 * CONNECTION_TIMEOUT_S)),
            (zmq.HEARTBEAT_TTL, int(1000 * CONNECTION_TIMEOUT_S)),
            (zmq.RECONNECT_IVL_MAX, 5000),
        ):
            self.socket.setsockopt(option, value)
        if secret_key is not None and server_key is not None:
            connect_curve(self.socket, secret_key, server_key)
        self.monitor = self.socket.get_monitor_socket(HANDSHAKE_EVENTS)
        self._handshake_failing = False  # said once until a handshake succeeds
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        self._poller.register(self.monitor, zmq.POLLIN)
        self.socket.connect(connect)
        self._models: dict[str, CountsSampler] = {}  # by weights SHA-256: the last one
        self._heartbeat_ms = int(1000 * HELLO_INTERVAL_S)  # the scan's, once it has one
        self.scans = 0

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close()
        self.context.term()

    def serve(self, once: bool = False, stop: threading.Event | None = None) -> None:
        """Serve scans until ``stop`` is set (or, with ``once``, until one scan ended).

        Raises:
            FeederRefusedError: when the feeder refuses this worker's key (CURVE).
        """
        session: InferenceSession | None = None
        scan_id = ""
        hello_ms = int(1000 * HELLO_INTERVAL_S)
        self.log(f"worker: waiting for a feeder at {self.connect}")
        while not (stop is not None and stop.is_set()):
            events = dict(self._poller.poll(hello_ms if session is None else self._heartbeat_ms))
            if self.monitor in events:
                self._check_handshake(recv_monitor_message(self.monitor))
            if self.socket not in events:
                self._send_now(session)
                continue
            if session is None:
                message = self._receive_one()
                if isinstance(message, RemoteConfig):
                    session, scan_id = self._start_scan(message)
                continue
            line_outs, malformed, commands = session.receive(self.socket)
            ending = next((c.kind for c in commands if isinstance(c, Stop | Reset)), None)
            if ending is None and line_outs:
                ending = self._run_batch(session, line_outs)
            elif ending is None and malformed:
                self._send(Credit(id=session.worker_id, credits=session.credits()))
            if ending is not None:
                self.log(
                    f"worker: scan {scan_id} ended ({ending}): {session.inferred} exposures "
                    f"in {session.batches} batches"
                )
                session = None
                self.scans += 1
                if once:
                    return

    def _check_handshake(self, event: Mapping[str, Any]) -> None:
        """Raise :class:`FeederRefusedError` when the feeder refused this worker's key; say
        once (until a handshake succeeds) that a handshake failed otherwise."""
        kind = event["event"]
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._handshake_failing = False
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            key = (
                "this worker's public key"
                if self.secret_key is None
                else f"{Path(self.secret_key).name.removesuffix('.key_secret')}.key"
            )
            raise FeederRefusedError(
                f"the feeder at {self.connect} refused this worker's key (CURVE): is {key} in "
                "the feeder's --authorized-keys folder?"
            )
        elif not self._handshake_failing:
            self._handshake_failing = True
            question = (
                "does the feeder expect CURVE keys (--key, --server-key)?"
                if self.server_key is None
                else f"is --server-key {self.server_key} the feeder's public key?"
            )
            self.log(
                f"worker: the handshake with the feeder at {self.connect} failed: {question} "
                "(retrying)"
            )

    def _send_now(self, session: InferenceSession | None) -> None:
        """Send a hello (no scan yet) or a heartbeat if a feeder is connected; drop it
        otherwise."""
        pid, host = os.getpid(), network.gethostname()
        message: Hello | Heartbeat = (
            Hello(pid=pid, host=host)
            if session is None
            else Heartbeat(id=session.worker_id, pid=pid, host=host)
        )
        with contextlib.suppress(zmq.Again):
            self.socket.send_multipart(message.to_frames(), zmq.NOBLOCK)

    def _send(self, message: WireMessage) -> None:
        self.socket.send_multipart(message.to_frames())

    def _receive_one(self) -> WireMessage | None:
        frames = self.socket.recv_multipart(copy=False)
        try:
            return read([f.buffer for f in frames])
        except ProtocolError as error:
            self.log(f"worker: dropped a malformed message: {error}")
            return None

    def _start_scan(self, message: RemoteConfig) -> tuple[InferenceSession | None, str]:
        """Load the scan's model (unless it is the last one) and say ready with credits."""
        config = PipelineConfig.model_validate_json(message.config)
        digest = message.model_sha256
        if digest not in self._models:
            self._models.clear()
            with tempfile.TemporaryDirectory() as folder:
                weights = Path(folder) / "model.safetensors"
                weights.write_bytes(message.weights.tobytes())
                (Path(folder) / "model.json").write_bytes(message.card.tobytes())
                loaded = load(weights, device=self.device)  # checks the weights' SHA-256
            if loaded.card["weights_sha256"] != digest:
                raise ValueError("the feeder's model does not match the SHA-256 it announced")
            compile_if_asked(loaded, config.inference)
            self._models[digest] = loaded
        model = self._models[digest]
        session = InferenceSession.start(model, config, message.worker_id)
        ready = Ready(
            role="worker",
            id=session.worker_id,
            pid=os.getpid(),
            host=network.gethostname(),
            device=str(model.device),
            threads=torch.get_num_threads(),
            credits=session.credits(),
        )
        try:
            self._send(ready)
        except zmq.Again:  # the feeder went away while the model loaded
            return None, ""
        self._heartbeat_ms = int(1000 * config.transport.heartbeat_interval_s)
        self.log(
            f"worker: scan {config.scan_id} as worker {session.worker_id} on {model.device}, "
            f"model {digest[:12]}, batches up to {session.sizer.limit}"
        )
        return session, config.scan_id

    def _run_batch(
        self, session: InferenceSession, line_outs: list[LineOutMessage | FrameMessage]
    ) -> str | None:
        """Infer one batch and send its results and credits; ``"lost"`` if the feeder is gone."""
        outgoing, credit = session.run(line_outs)
        try:
            self._send(credit)  # before the results (see InferenceSession.run)
            for message in outgoing:
                self.socket.send_multipart(message.to_frames(), copy=False)
        except zmq.Again:  # no connection for CONNECTION_TIMEOUT_S: the feeder re-sends them
            return "lost"
        return None
