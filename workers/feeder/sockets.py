"""The feeder's ZeroMQ sockets.

- ``work`` (ROUTER, bound): line-outs to the workers, by credit; their ``ready``, ``credit``
  and ``heartbeat`` back (and a remote worker's ``hello``, ``results`` and ``failed``, when
  :mod:`~workers.feeder.remote_work` binds it a second time). ``ROUTER_MANDATORY``: sending
  to a worker whose connection is gone fails at once.
- ``acks`` (PULL, bound): the writer's ``ready`` and acknowledgements.
- ``control`` (PUB, bound): ``stop`` to every local process.
- ``to_writer`` (PUSH, connected to the writer's ``results``): failure records, and remote
  workers' results.

Every socket that receives refuses message parts larger than ``transport.max_message_bytes``
(ZeroMQ disconnects the sender). :meth:`FeederSockets.service` reads what arrives as typed
messages (:mod:`pipeline.transport.messages`) for the feeder's handlers, drops (logs and
counts) a message that does not follow the wire format or lacks a field, and logs each peer
that disconnects (a monitor on ``work`` and ``acks``). It also wakes for the file
descriptors given to :meth:`FeederSockets.watch` (the integrator processes' pipes).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from pipeline.config import PipelineConfig
    >>> from pipeline.transport import Endpoints
    >>> config, context = PipelineConfig(scan_id="doc"), zmq.Context()
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     endpoints = Endpoints.resolve(config.transport, Path(folder))
    ...     sockets = FeederSockets(context, endpoints, config, key_refused=lambda: False)
    ...     print(sockets.service(0, from_worker=print, from_writer=print))
    ...     sockets.close()
    0
    >>> context.term()
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from pipeline.config import PipelineConfig
from pipeline.transport import Endpoints, ProtocolError
from pipeline.transport.messages import WireMessage, read

log = logging.getLogger(__name__)


class FeederSockets:
    """The ``work``, ``acks``, ``control`` and ``to_writer`` sockets of the scan of
    ``config`` on ``endpoints``, made in ``context``. ``key_refused()`` says whether a
    remote worker's CURVE key was just refused (and logged): its disconnect is not logged
    again."""

    def __init__(
        self,
        context: zmq.Context,
        endpoints: Endpoints,
        config: PipelineConfig,
        key_refused: Callable[[], bool],
    ) -> None:
        self.config = config
        self.key_refused = key_refused
        #: messages dropped because they did not follow the wire format or lacked a field
        self.malformed = 0
        transport = config.transport
        self.work = context.socket(zmq.ROUTER)
        self.work.setsockopt(zmq.LINGER, 0)
        self.work.setsockopt(zmq.MAXMSGSIZE, transport.max_message_bytes)
        self.work.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished worker is known at once
        self.work.setsockopt(zmq.SNDHWM, 0)  # bounded by the workers' credits
        self.work.setsockopt(zmq.RCVHWM, 0)
        self.work.bind(endpoints.work)
        self.acks = context.socket(zmq.PULL)
        self.acks.setsockopt(zmq.MAXMSGSIZE, transport.max_message_bytes)
        self.acks.bind(endpoints.acks)
        self.control = context.socket(zmq.PUB)
        self.control.bind(endpoints.control)
        # failure records, and remote workers' results, straight to the writer
        self.to_writer = context.socket(zmq.PUSH)
        self.to_writer.setsockopt(zmq.LINGER, 5000)
        self.to_writer.connect(endpoints.results)
        self._poller = zmq.Poller()  # workers' messages and the writer's acknowledgements
        self._poller.register(self.work, zmq.POLLIN)
        self._poller.register(self.acks, zmq.POLLIN)
        self._monitors = {  # disconnected peers, for the log
            self.work.get_monitor_socket(zmq.EVENT_DISCONNECTED): "work",
            self.acks.get_monitor_socket(zmq.EVENT_DISCONNECTED): "acks",
        }
        for monitor in self._monitors:
            self._poller.register(monitor, zmq.POLLIN)
        self._watched: set[int] = set()
        self._watch: Callable[[], Collection[int]] = frozenset
        self._on_watched: Callable[[], object] = lambda: None

    def watch(self, fds: Callable[[], Collection[int]], on_readable: Callable[[], object]) -> None:
        """Wake :meth:`service` also when one of the file descriptors ``fds()`` (asked anew
        before each poll) is readable, and call ``on_readable()``, which must read them."""
        self._watch, self._on_watched = fds, on_readable

    def _poll(self, timeout_ms: int) -> dict[Any, int]:
        fds = set(self._watch())
        for gone in self._watched - fds:
            self._poller.unregister(gone)
        for new in fds - self._watched:
            self._poller.register(new, zmq.POLLIN)
        self._watched = fds
        return dict(self._poller.poll(timeout_ms))

    def service(
        self,
        timeout_ms: int,
        from_worker: Callable[[bytes, list[zmq.Frame], WireMessage], object],
        from_writer: Callable[[WireMessage], int],
    ) -> int:
        """Hand what arrives to ``from_worker(identity, frames, message)`` (``work``) and
        ``from_writer(message)`` (``acks``; it returns how many exposures were newly
        acknowledged), waiting up to ``timeout_ms`` for the first message, until nothing
        more waits; return how many exposures were newly acknowledged. A handler's
        ``ProtocolError``, ``KeyError``, ``TypeError`` or ``ValueError`` drops its message."""
        acknowledged = 0
        events = self._poll(timeout_ms)
        while events:
            if self.work in events:
                frames = self.work.recv_multipart(copy=False)
                with self._dropping_malformed("work"):
                    message = read([f.buffer for f in frames[1:]])
                    from_worker(frames[0].bytes, frames[1:], message)
            if self.acks in events:
                acks = self.acks.recv_multipart()
                with self._dropping_malformed("acks"):
                    acknowledged += from_writer(read(acks))
            for monitor, name in self._monitors.items():
                if monitor in events:
                    self._log_disconnect(name, recv_monitor_message(monitor))
            if events.keys() & self._watched:
                self._on_watched()
            events = self._poll(0)
        return acknowledged

    @contextlib.contextmanager
    def _dropping_malformed(self, socket: str) -> Iterator[None]:
        """Log and drop a message that does not follow the wire format or lacks a field."""
        try:
            yield
        except (ProtocolError, KeyError, TypeError, ValueError) as error:
            self.malformed += 1
            log.warning(
                "scan %s: dropped a malformed message on %s: %r", self.config.scan_id, socket, error
            )

    def _log_disconnect(self, socket: str, event: Mapping[str, Any]) -> None:
        """Log a peer that disconnected, unless it is a remote worker whose CURVE key was just
        refused: the authenticator has logged that, with the worker's address."""
        if socket == "work" and self.key_refused():
            return
        log.warning(
            "scan %s: a peer of the %s socket disconnected (%s): a process that exited, or a "
            "message larger than max_message_bytes (%d B)",
            self.config.scan_id,
            socket,
            event["endpoint"].decode(errors="replace"),
            self.config.transport.max_message_bytes,
        )

    def close(self) -> None:
        """Close every socket: ``work`` after up to 1 s for the stops to remote workers to
        go out, the others at once."""
        for socket in (self.work, self.acks):
            socket.disable_monitor()
        for monitor in self._monitors:
            monitor.close(linger=0)
        self.work.close(linger=1000)  # the stops to remote workers go out
        for socket in (self.acks, self.control, self.to_writer):
            socket.close(linger=0)
