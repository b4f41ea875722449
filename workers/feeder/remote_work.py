"""The endpoint for inference workers on other nodes (:mod:`workers.remote`):
``transport.remote_work``, the feeder's ``work`` socket bound a second time.

:class:`RemoteWork` binds it (with CURVE when keys are configured, and ZeroMQ's heartbeats),
answers a worker's ``hello`` with the scan's configuration and model files
(:class:`~pipeline.transport.messages.RemoteConfig`, each worker numbered after the local
ones), tells a worker it does not know (dropped, or of an earlier scan) to start over with
``reset``, and each worker it greeted to ``stop`` at the end of the scan (they then wait for
the next one). Once greeted, a remote worker takes work by credit like a local one.

Example:
    >>> from pipeline.config import PipelineConfig
    >>> remote = RemoteWork(PipelineConfig(scan_id="doc", n_workers=2))
    >>> remote.endpoint is None, remote.greeted, remote.joined  # not bound yet
    (True, (), 0)
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import zmq

from pipeline.config import PipelineConfig
from pipeline.model import read_card
from pipeline.model.checkpoint import card_path, resolve_model
from pipeline.transport.messages import Ready, RemoteConfig, Reset, Stop, WireMessage
from pipeline.transport.security import CurveAuthenticator, serve_curve, start_authenticator

log = logging.getLogger(__name__)


class RemoteWork:
    """Remote workers' side of the feeder's ``work`` socket (a ROUTER), once :meth:`bind`
    has bound it for them."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.work: zmq.Socket | None = None
        #: the address bound, once :meth:`bind` has bound it
        self.endpoint: str | None = None
        #: remote workers that joined the scan (said they are ready)
        self.joined = 0
        self._authenticator: CurveAuthenticator | None = None
        self._config: RemoteConfig | None = None  # what remote workers are sent
        self._greeted: dict[bytes, int] = {}  # sent the configuration: their numbers
        self._next_number = config.n_workers  # numbered after the local workers

    def bind(self, context: zmq.Context, work: zmq.Socket) -> None:
        """Bind ``work`` a second time, on ``transport.remote_work``: with CURVE when keys are
        configured, and ZeroMQ's heartbeats; read the model files remote workers are sent."""
        self.work = work
        transport = self.config.transport
        assert transport.remote_work is not None  # (only then is there a remote endpoint)
        if transport.curve_secret_key is not None and transport.curve_authorized_keys is not None:
            self._authenticator = start_authenticator(context, transport.curve_authorized_keys)
            serve_curve(work, transport.curve_secret_key)
        interval_ms = int(1000 * transport.heartbeat_interval_s)
        work.setsockopt(zmq.HEARTBEAT_IVL, interval_ms)
        work.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(1000 * transport.worker_timeout_s))
        work.bind(transport.remote_work)
        self.endpoint = work.getsockopt_string(zmq.LAST_ENDPOINT)
        weights = resolve_model(self.config.inference.model)
        self._config = RemoteConfig(
            config=self.config.model_dump_json(),
            worker_id=-1,  # each remote worker's number goes in when it is greeted
            model_sha256=read_card(weights)["weights_sha256"],
            weights=np.frombuffer(Path(weights).read_bytes(), np.uint8),
            card=np.frombuffer(card_path(Path(weights)).read_bytes(), np.uint8),
        )

    @property
    def greeted(self) -> tuple[int, ...]:
        """The numbers of the remote workers sent the configuration and not dropped since."""
        return tuple(self._greeted.values())

    def greet(self, identity: bytes) -> None:
        """Send a remote worker that said hello the scan's configuration and model files."""
        if self._config is None or identity in self._greeted:
            return
        number = self._next_number
        self._next_number += 1
        self._greeted[identity] = number
        self._send(identity, replace(self._config, worker_id=number))

    def greeted_as(self, identity: bytes, number: int) -> bool:
        """The worker of ``identity`` was greeted as worker ``number``."""
        return self._greeted.get(identity) == number

    def join(self, ready: Ready) -> None:
        """Count and log a greeted worker that said it is ready."""
        self.joined += 1
        log.info(
            "scan %s: remote worker %d joined from %s (%s)",
            self.config.scan_id,
            ready.id,
            ready.host,
            ready.device,
        )

    def forget(self, identity: bytes) -> None:
        """Forget a worker that was dropped: it starts over with a hello."""
        self._greeted.pop(identity, None)

    def reset(self, identity: bytes) -> None:
        """Tell a worker this feeder does not know (any more) to start over."""
        self.forget(identity)
        self._send(identity, Reset())

    def stop(self) -> None:
        """Tell each greeted worker that the scan ended: it waits for the next."""
        for identity in self._greeted:
            self._send(identity, Stop())

    def take_refusal(self) -> bool:
        """Whether a worker's CURVE key was refused (and logged) since the last call."""
        return self._authenticator is not None and self._authenticator.take_refusal()

    def close(self) -> None:
        """Stop the CURVE authenticator, if one was started."""
        if self._authenticator is not None:
            self._authenticator.stop()

    def _send(self, identity: bytes, message: WireMessage) -> None:
        """Send a command to one worker, unless it is no longer connected."""
        assert self.work is not None  # (bound: only then are there remote workers)
        try:
            self.work.send_multipart([identity, *message.to_frames()], zmq.NOBLOCK)
        except zmq.ZMQError as error:
            if error.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
