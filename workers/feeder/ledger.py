"""The exposures in flight between the feeder and the writer, without sockets or clocks.

The :class:`Ledger` keeps each line-out (as the frames of its message) from the moment it is
handed over until the writer acknowledges it, and each failure record likewise; it queues
the line-outs waiting for a worker's credit, knows every worker's credits and what each
holds (sent, not yet acknowledged), and hands a lost worker's exposures to the others first.
It counts duplicates and re-sent exposures, and keeps each acknowledged exposure's status
and latency. Times are passed in by the caller (seconds of one clock).

Work goes out by credit (the zguide's load-balancing pattern): each waiting exposure to the
worker with the most credits.

Example:
    >>> ledger = Ledger(high_water_mark=4, largest_capacity=16)
    >>> ledger.join(b"w0", number=0, pid=100, credits=2, now_s=0.0)
    >>> for index in range(3):
    ...     ledger.take(index, at_s=0.0)
    ...     ledger.hold_line_out(index, [b"line-out"])
    >>> while (sending := ledger.next_send()) is not None:
    ...     ledger.sent(sending.worker, sending.index)
    >>> sorted(ledger.workers[b"w0"].holding), ledger.waiting
    ([0, 1], (2,))
    >>> ledger.acknowledge(0, "ok", error="", duplicate=False, now_s=0.25)
    0.25
    >>> ledger.lose(b"w0"), ledger.waiting  # exposure 1 goes first to the next worker
    ([1], (1, 2))
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pipeline.transport.messages import Acks
from workers.feeder.reports import RecentResult

#: A message as its ZeroMQ frames (:meth:`~pipeline.transport.messages.WireMessage.to_frames`).
Frames = list[Any]


@dataclass
class Worker:
    """An inference worker as the feeder sees it: its socket identity, process, credits and
    the exposures it holds (sent, not yet acknowledged by the writer)."""

    identity: bytes
    number: int
    pid: int
    credits: int
    #: when it last sent anything, s (the caller's clock)
    last_seen: float
    holding: set[int] = field(default_factory=set)
    #: the credits it asked for when it started (twice its largest batch), at most twice the
    #: largest batch a worker may take
    capacity: int = 0
    #: a worker on another node (``host``), not a child of the feeder
    remote: bool = False
    host: str = ""

    def state(self) -> WorkerState:
        """A read-only copy of what this worker is now."""
        return WorkerState(
            self.number, self.pid, self.host, self.remote, self.credits, frozenset(self.holding)
        )


@dataclass(frozen=True)
class WorkerState:
    """A worker at one moment, for whoever watches the feeder: its number, process id and
    host, whether it is remote, its credits and the exposures it holds."""

    number: int
    pid: int
    host: str
    remote: bool
    credits: int
    holding: frozenset[int]


@dataclass(frozen=True)
class Sending:
    """The next line-out to send (:meth:`Ledger.next_send`): to ``worker``, exposure
    ``index``, as ``frames``."""

    worker: Worker
    index: int
    frames: Frames


class Ledger:
    """The exposures in flight, the queue waiting for credit and the workers' credits.

    ``high_water_mark`` and ``largest_capacity`` (twice the largest batch any worker may
    take) bound the line-outs kept (:meth:`in_flight_limit`).
    """

    def __init__(self, high_water_mark: int, largest_capacity: int) -> None:
        self.high_water_mark = high_water_mark
        self.largest_capacity = largest_capacity
        self._line_outs: dict[int, Frames] = {}  # not yet acknowledged: index -> its message
        self._failure_records: dict[int, Frames] = {}  # likewise, failure records
        self._queue: deque[int] = deque()  # line-outs waiting for a worker's credit
        self._workers: dict[bytes, Worker] = {}
        self._handed_over_s: dict[int, float] = {}
        self._status: dict[int, str] = {}  # acknowledged: index -> status, in that order
        self._latency_s: dict[int, float] = {}
        #: acknowledged exposures that failed: index -> error
        self.failures: dict[int, str] = {}
        #: acknowledgements of exposures acknowledged already, or stored by an earlier writer
        self.duplicates = 0
        #: exposures sent again (a lost worker's, or all unacknowledged after a new writer)
        self.resent = 0

    # -- handing over ----------------------------------------------------------------------
    def take(self, index: int, at_s: float) -> None:
        """Note exposure ``index`` handed over at ``at_s``, from when its latency counts;
        ValueError if it was handed over before."""
        if index in self._handed_over_s:
            raise ValueError(f"exposure {index} was already submitted")
        self._handed_over_s[index] = at_s

    def hold_line_out(self, index: int, frames: Frames) -> None:
        """Keep a line-out's message until it is acknowledged, and queue it for a worker."""
        self._line_outs[index] = frames
        self._queue.append(index)

    def hold_failure(self, index: int, frames: Frames) -> None:
        """Keep a failure record's message until it is acknowledged (a writer started again
        gets it again)."""
        self._failure_records[index] = frames

    @property
    def in_flight(self) -> int:
        """Line-outs sent or waiting for a worker, not yet acknowledged."""
        return len(self._line_outs)

    def in_flight_limit(self) -> int:
        """Line-outs kept until the writer acknowledges them before the feeder waits: for
        each worker, the high-water mark or its capacity (the credits it asked for at start,
        twice its largest batch, so a GPU worker's batches can fill), whichever is more.

        >>> ledger = Ledger(high_water_mark=64, largest_capacity=4096)
        >>> ledger.in_flight_limit()  # no worker yet
        64
        >>> ledger.join(b"cpu", 0, 1, credits=16, now_s=0.0)
        >>> ledger.join(b"gpu", 1, 2, credits=4096, now_s=0.0)
        >>> ledger.in_flight_limit()
        4160
        """
        most = self.high_water_mark
        return max(most, sum(max(most, worker.capacity) for worker in self._workers.values()))

    # -- workers -----------------------------------------------------------------------------
    def join(
        self,
        identity: bytes,
        number: int,
        pid: int,
        credits: int,
        now_s: float,
        remote: bool = False,
        host: str = "",
    ) -> None:
        """Count a worker that said it is ready, with the credits it asked for."""
        self._workers[identity] = Worker(
            identity,
            number,
            pid,
            credits,
            now_s,
            capacity=min(credits, self.largest_capacity),
            remote=remote,
            host=host,
        )

    @property
    def workers(self) -> Mapping[bytes, Worker]:
        """The workers connected, by socket identity (read-only)."""
        return MappingProxyType(self._workers)

    def heard_from(self, identity: bytes, now_s: float) -> Worker | None:
        """The worker of ``identity``, seen at ``now_s``; ``None`` if it is not known."""
        worker = self._workers.get(identity)
        if worker is not None:
            worker.last_seen = now_s
        return worker

    def credit(self, identity: bytes, credits: int) -> None:
        """Give a known worker back ``credits``."""
        self._workers[identity].credits += credits

    def silent(self, now_s: float, timeout_s: float) -> list[Worker]:
        """The workers that sent nothing for more than ``timeout_s`` before ``now_s``."""
        return [w for w in self._workers.values() if now_s - w.last_seen > timeout_s]

    def lose(self, identity: bytes) -> list[int] | None:
        """Forget a worker and queue the exposures it held, not yet acknowledged, to be sent
        first (counted as re-sent); return them, or ``None`` if it was not known."""
        worker = self._workers.pop(identity, None)
        if worker is None:
            return None
        lost = sorted(worker.holding - self._status.keys())
        self._queue.extendleft(reversed(lost))
        self.resent += len(lost)
        return lost

    # -- sending -----------------------------------------------------------------------------
    def next_send(self) -> Sending | None:
        """The first waiting line-out and the worker with most credits to send it to;
        ``None`` when none waits or no worker has credit. Waiting exposures acknowledged
        meanwhile (re-sent ones) leave the queue here; the one returned stays first in it
        until :meth:`sent`."""
        while self._queue:
            worker = max(self._workers.values(), key=lambda w: w.credits, default=None)
            if worker is None or worker.credits <= 0:
                return None
            index = self._queue[0]
            if index in self._status:
                self._queue.popleft()
                continue
            return Sending(worker, index, self._line_outs[index])
        return None

    def sent(self, worker: Worker, index: int) -> None:
        """``worker`` took exposure ``index`` (the first waiting) for one of its credits."""
        if not self._queue or self._queue[0] != index:
            raise ValueError(f"exposure {index} is not the first waiting")
        self._queue.popleft()
        worker.credits -= 1
        worker.holding.add(index)

    @property
    def waiting(self) -> tuple[int, ...]:
        """The exposures waiting for a worker's credit, first to go first."""
        return tuple(self._queue)

    def resend_unwritten(self) -> tuple[int, list[Frames]]:
        """For a writer started again: queue every line-out not acknowledged (first, unless
        waiting already), and return how many, with the failure records to send again; all
        are counted as re-sent."""
        lost = sorted(self._line_outs.keys() - set(self._queue) - self._status.keys())
        self._queue.extendleft(reversed(lost))
        records = list(self._failure_records.values())
        self.resent += len(lost) + len(records)
        return len(lost), records

    # -- acknowledgements --------------------------------------------------------------------
    def acknowledge(
        self, index: int, status: str, error: str, duplicate: bool, now_s: float
    ) -> float | None:
        """Record that the writer stored exposure ``index`` (``duplicate``: a row an earlier
        writer stored without acknowledging it); its latency since it was handed over (NaN
        if it never was), or ``None`` if it was acknowledged before."""
        if index in self._status:
            self.duplicates += 1
            return None
        if duplicate:
            self.duplicates += 1
        self._status[index] = status
        latency_s = now_s - self._handed_over_s.get(index, math.nan)
        self._latency_s[index] = latency_s
        if status != "ok":
            self.failures[index] = error
        self._line_outs.pop(index, None)
        self._failure_records.pop(index, None)
        for worker in self._workers.values():
            worker.holding.discard(index)
        return latency_s

    def acknowledge_block(self, acks: Acks, now_s: float) -> list[RecentResult]:
        """Record a block the writer stored (:meth:`acknowledge` for each of its exposures,
        at ``now_s``); the exposures newly acknowledged, with their posterior summaries
        when ``ok``."""
        rows = zip(
            acks.index.tolist(),
            acks.status,
            acks.error,
            acks.duplicate.tolist(),
            acks.mean.tolist(),
            acks.sd.tolist(),
            acks.quantiles.tolist(),
            acks.predictive_z.tolist(),
            strict=True,
        )
        results = []
        for index, status, error, duplicate, mean, sd, quantiles, z in rows:
            latency_s = self.acknowledge(index, str(status), str(error), bool(duplicate), now_s)
            if latency_s is None:
                continue
            ok = status == "ok"
            results.append(
                RecentResult(
                    index,
                    str(status),
                    latency_s,
                    tuple(mean) if ok else (),
                    tuple(sd) if ok else (),
                    tuple(tuple(row) for row in quantiles) if ok else (),
                    str(error),
                    float(z),
                )
            )
        return results

    @property
    def acknowledged(self) -> Mapping[int, str]:
        """Status of each exposure acknowledged, in the order acknowledged (read-only)."""
        return MappingProxyType(self._status)

    @property
    def latencies_s(self) -> Mapping[int, float]:
        """Time from hand-over to acknowledgement of each exposure acknowledged, s."""
        return MappingProxyType(self._latency_s)

    @property
    def handed_over_s(self) -> Mapping[int, float]:
        """When each exposure was handed over (:meth:`take`), s."""
        return MappingProxyType(self._handed_over_s)

    def missing(self) -> list[int]:
        """The exposures handed over and not yet acknowledged, in index order."""
        return sorted(self._handed_over_s.keys() - self._status.keys())
