"""The ZeroMQ side of the DECTRIS stream: :class:`DectrisStream` connects a PULL socket to the
detector control unit's PUSH socket, waits for messages (time-outs, reconnection after a
dropped connection, :meth:`~DectrisStream.stop`), parses them
(:mod:`pipeline.sources.dectris.messages`) and hands them to a
:class:`~pipeline.sources.dectris.assembler.SeriesAssembler`, one per series, which turns them
into exposures.

An iteration ends at the series' end message, at a header of a new series (kept for the next
iteration), after ``idle_timeout_s`` of silence (or ``start_timeout_s`` before the series
began), or after :meth:`~DectrisStream.stop`, never by an exception for bad input; then the
images the series should have had but never came follow as failed exposures
(``report_missing``). Only the end message ends it cleanly
(:attr:`~DectrisStream.ended_cleanly`): the series gave everything it had.

Example (needs a detector or a simulator streaming at the endpoint)::

    >>> with DectrisStream("tcp://127.0.0.1:9999", idle_timeout_s=5.0) as stream:  # doctest: +SKIP
    ...     for exposure in stream:
    ...         print(exposure.index, exposure.frame.shape, exposure.error)
    ...     print(stream.statistics.summary())
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator

import zmq
import zmq.utils.monitor

from pipeline.exposure import Exposure
from pipeline.sources.compression import FormatError
from pipeline.sources.dectris.assembler import SeriesAssembler, SeriesEnded, StreamStatistics
from pipeline.sources.dectris.messages import Protocol, SeriesHeader, parse_message

log = logging.getLogger(__name__)


class DectrisStream:
    """Exposures received live from a DECTRIS detector's stream (v1 or v2) over ZeroMQ PULL.

    Each iteration yields the exposures of one series, then ends (see the module docstrings
    of this module and of :mod:`pipeline.sources.dectris.assembler` for what ends it and how
    bad input is reported); iterate again for the next series on the same connection.
    :attr:`statistics` and :attr:`header` describe the series of the latest iteration. Use it
    as a context manager, or call :meth:`close`.

    Args:
        endpoint: the detector's stream, e.g. ``tcp://10.0.0.5:9999`` (v1) or ``:31001`` (v2).
        scan_id: the exposures' scan id; default the v2 ``series_unique_id`` or
            ``dectris-series-N``.
        protocol: ``auto`` (per message), ``v1`` or ``v2``.
        series_id: take only this series (e.g. the ``sequence id`` returned by ``arm``);
            messages of others are dropped and counted. Default: the first one that comes.
        idle_timeout_s: end the series when no message came for this long once it started.
        start_timeout_s: give up when no message came for this long before the series
            started; ``None`` waits until :meth:`stop`.
        receive_hwm: ZeroMQ receive high-water mark (messages queued before the detector
            blocks).
        max_message_bytes: ZeroMQ ``MAXMSGSIZE``: libzmq drops the connection, and with it the
            message, when a message part is larger (the image then shows up as missing); the
            source then connects again, keeping what had already come. ``None``: no limit.
        threshold: v2 channel to take: its position in the start message's ``channels``
            (0: the first threshold) or its name.
        require_header: fail the images that come before their series header (``True``), or
            decode them anyway (``False``, e.g. when connecting to a series already running).
        report_missing: deliver a failed exposure for every image that never came.
        decode_frames: decode each image here (``True``), or check it and leave it
            compressed, as the exposure's ``encoded``, for integrator processes to decode
            (``False``: the costly part of receiving a frame leaves this process).
        context: the ZeroMQ context (default: the process-wide one).

    Attributes:
        connected: whether the connection to the detector is up (as libzmq last reported).
        ended_cleanly: whether the latest iteration ended on its series' end message (the
            images that never came are failed exposures then), not on a time-out, a new
            series' header or :meth:`stop`; ``False`` until it ended.
    """

    POLL_INTERVAL_S = 0.1

    def __init__(
        self,
        endpoint: str,
        scan_id: str | None = None,
        *,
        protocol: Protocol = "auto",
        series_id: int | None = None,
        idle_timeout_s: float = 10.0,
        start_timeout_s: float | None = None,
        receive_hwm: int = 1000,
        max_message_bytes: int | None = None,
        threshold: int | str = 0,
        require_header: bool = True,
        report_missing: bool = True,
        decode_frames: bool = True,
        context: zmq.Context | None = None,
    ) -> None:
        if protocol not in ("auto", "v1", "v2"):
            raise ValueError(f"protocol {protocol!r} is not auto, v1 or v2")
        if idle_timeout_s <= 0 or (start_timeout_s is not None and start_timeout_s <= 0):
            raise ValueError("timeouts must be positive")
        self.endpoint = endpoint
        self.scan_id = scan_id
        self.protocol = protocol
        self.series_id = series_id
        self.idle_timeout_s = idle_timeout_s
        self.start_timeout_s = start_timeout_s
        self.receive_hwm = receive_hwm
        self.max_message_bytes = max_message_bytes
        self.threshold = threshold
        self.require_header = require_header
        self.report_missing = report_missing
        self.decode_frames = decode_frames
        self._assembler = self._new_assembler()
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._backlog: deque[list[zmq.Frame]] = deque()
        self._stop = threading.Event()
        self.connected = False
        self.ended_cleanly = False

    @property
    def statistics(self) -> StreamStatistics:
        """Counts of the series of the latest iteration (so far, while it runs)."""
        return self._assembler.statistics

    @property
    def header(self) -> SeriesHeader | None:
        """The header of the series of the latest iteration, once it came."""
        return self._assembler.header

    @property
    def socket(self) -> zmq.Socket | None:
        """The PULL socket, once connected (``None`` before :meth:`connect` and after
        :meth:`close`); for inspection: receiving from it takes messages from the series."""
        return self._socket

    def _new_assembler(self) -> SeriesAssembler:
        return SeriesAssembler(
            self.endpoint,
            self.scan_id,
            series_id=self.series_id,
            require_header=self.require_header,
        )

    # -- connection --------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the PULL socket and connect it (done by the first iteration if not before;
        connect before arming a detector whose PUSH socket drops messages without a peer)."""
        if self._socket is not None:
            return
        socket = self._context.socket(zmq.PULL)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, self.receive_hwm)
        if self.max_message_bytes is not None:
            socket.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        self._monitor = socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        socket.connect(self.endpoint)
        self._socket = socket

    def wait_connected(self, timeout_s: float) -> bool:
        """Connect, and wait until the connection to the detector is up; ``False`` when it is
        not within ``timeout_s``. Useful before arming a detector (or simulator) that drops
        messages while no receiver is connected."""
        self.connect()
        assert self._monitor is not None
        deadline = time.monotonic() + timeout_s
        while not self.connected:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or not self._monitor.poll(int(remaining_s * 1000)):
                return self.connected
            self._monitor_event()
        return True

    def _monitor_event(self) -> None:
        assert self._monitor is not None and self._socket is not None
        event = zmq.utils.monitor.recv_monitor_message(self._monitor)["event"]
        if event == zmq.EVENT_CONNECTED:
            self.connected = True
        elif event == zmq.EVENT_DISCONNECTED:
            # libzmq reconnects by itself after a network error but not after a protocol
            # error (such as a message over MAXMSGSIZE): keep what already came, then connect
            # anew either way.
            self.connected = False
            while self._socket.poll(0):
                self._backlog.append(self._socket.recv_multipart(copy=False))
            with contextlib.suppress(zmq.ZMQError):  # already gone after a protocol error
                self._socket.disconnect(self.endpoint)
            self._socket.connect(self.endpoint)
            note = f"the connection to {self.endpoint} was dropped; connecting again"
            if self.max_message_bytes is not None:
                note += (
                    f" (a message part over max_message_bytes = {self.max_message_bytes} "
                    "makes libzmq drop the connection, and the message with it)"
                )
            self.statistics.record(note)

    def close(self) -> None:
        """Close the socket; messages still queued in it are lost."""
        if self._socket is not None:
            self._socket.disable_monitor()
            if self._monitor is not None:
                self._monitor.close(linger=0)
            self._socket.close(linger=0)
        self._socket = self._monitor = None
        self.connected = False

    def stop(self) -> None:
        """Make the running iteration, or the next one when none runs, end once the messages
        already queued have been handled (from any thread or a signal handler)."""
        self._stop.set()

    def __enter__(self) -> DectrisStream:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Exposure]:
        return self.exposures()

    # -- receiving ---------------------------------------------------------------------------

    def _receive(self, timeout_s: float) -> list[zmq.Frame] | None:
        """The next message, or ``None`` when none came within ``timeout_s``."""
        assert self._socket is not None and self._monitor is not None
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while True:
            if self._backlog:
                return self._backlog.popleft()
            events = dict(poller.poll(int(max(0.0, deadline - time.monotonic()) * 1000)))
            if self._monitor in events:
                self._monitor_event()
                continue
            if self._socket in events:
                return self._socket.recv_multipart(copy=False)
            if time.monotonic() >= deadline:
                return None

    def _take(self, parts: list[zmq.Frame]) -> Exposure | SeriesEnded | None:
        """Parse one message and feed it to the series' assembler: what
        :meth:`SeriesAssembler.feed` returns; an unreadable message is counted (``None``)."""
        received_at = time.time()
        assembler = self._assembler
        try:
            message = parse_message(
                parts, self.protocol, self.threshold, assembler.channels, self.decode_frames
            )
        except FormatError as error:
            assembler.reject(error)
            return None
        return assembler.feed(message, received_at)

    def exposures(self) -> Iterator[Exposure]:
        """The exposures of the next series (the same as iterating the stream)."""
        self.connect()
        self.ended_cleanly = False
        self._assembler = assembler = self._new_assembler()
        try:
            yield from self._received(assembler)
        finally:
            self._stop.clear()  # a stop ends one iteration: the running one, or else the next
        missing = assembler.finish(now=time.time())
        log.info("DECTRIS stream %s: %s", self.endpoint, assembler.statistics.summary())
        if self.report_missing:
            yield from missing
        self.ended_cleanly = assembler.statistics.end_received

    def _received(self, assembler: SeriesAssembler) -> Iterator[Exposure]:
        """The exposures of ``assembler``'s series as its messages come, until the series
        ends (see the module docstring: end message, time-outs, :meth:`stop`)."""
        began = last_message = time.monotonic()
        while True:
            if self._stop.is_set():
                parts = self._receive(0.0)
                if parts is None:
                    assembler.stop()
                    return
            else:
                parts = self._receive(self.POLL_INTERVAL_S)
            if parts is None:
                if assembler.started:
                    limit_s: float | None = self.idle_timeout_s
                    waited_s = time.monotonic() - last_message
                else:
                    limit_s, waited_s = self.start_timeout_s, time.monotonic() - began
                if limit_s is not None and waited_s >= limit_s:
                    assembler.time_out(limit_s)
                    return
                continue
            last_message = time.monotonic()
            outcome = self._take(parts)
            if isinstance(outcome, Exposure):
                yield outcome
            elif isinstance(outcome, SeriesEnded):
                if outcome.next_series_id is not None:
                    self._backlog.appendleft(parts)  # the next series' header
                return
