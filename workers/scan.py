"""Run one scan: start the writer and inference workers, integrate and send frames, collect
acknowledgements, stop everything cleanly.

:class:`ScanRunner` is the feeder process of DESIGN.md section 2: it owns the scan's pyFAI
integrator (one per process), binds the ``work``, ``acks`` and ``control`` endpoints, and
starts ``python -m workers.writer`` and ``python -m workers.inference`` as child processes
whose logs go to ``OUTPUT_DIR/logs/SCAN_ID/``. A frame that cannot be integrated becomes a
failure record sent straight to the writer, so the file has a row for every exposure.

Work goes to the workers by credit (the zguide's load-balancing pattern over a ROUTER
socket): each worker says how many line-outs it will take and gets no more, so a slow worker
never holds a queue of exposures. The feeder keeps every line-out until the writer
acknowledges it; a worker that exits or stays silent for ``transport.worker_timeout_s`` is
replaced, and the exposures it held go to the others (the writer stores each exposure once,
so one that was already written is only acknowledged again). The line-outs in flight are
bounded (per worker ``transport.high_water_mark`` or twice its largest batch, whichever is
more): beyond that, :meth:`submit` waits.

Workers on other nodes (:mod:`workers.remote`) connect to ``transport.remote_work`` (CURVE
unless loopback), the same ROUTER socket bound a second time: they say ``hello``, get the
configuration and the model's files, and then take work by credit like local ones; their
results come back over that socket and the feeder passes them to the writer. A remote worker
that goes silent is dropped (its exposures go to the others), not replaced; at the end of
the scan each is told to ``stop`` and waits for the next scan.

The writer acknowledges each block it stored in one message, with each exposure's
posterior summaries; the newest
:data:`RECENT_RESULTS` are kept in :attr:`ScanRunner.recent` for live views (older ones are
only in the file). A peer that ZeroMQ disconnects (a message part over
``transport.max_message_bytes``, or a process that exited) is logged.

It is plain Python (no Prefect): the flows in ``flows/`` call it.

Example:
    >>> from pipeline.config import PipelineConfig
    >>> from pipeline.sources import SimulatedDetector
    >>> config = PipelineConfig(scan_id="doc", n_workers=1, output_dir=tmp)  # doctest: +SKIP
    >>> with ScanRunner(config) as runner:                                   # doctest: +SKIP
    ...     for exposure in SimulatedDetector(config.integration).exposures("doc", 4):
    ...         runner.submit(exposure)
    ...     summary = runner.wait()
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from pipeline.config import PipelineConfig
from pipeline.exposure import Exposure, LineOut
from pipeline.integration import FrameError, NoPixelInRange, exposure_normalization
from pipeline.model import read_card
from pipeline.model.checkpoint import card_path, resolve_model
from pipeline.physics import PARAMETER_NAMES
from pipeline.physics.quality import Z_THRESHOLD
from pipeline.preflight import GeometryMismatch, check_model_geometry, checked_integrator
from pipeline.scratch import make_scratch_dir
from pipeline.sources.identity import FileStamp
from pipeline.store import read_completion
from pipeline.store.lock import ResultsLock
from pipeline.store.results import making
from pipeline.store.resume import ResumePlan, plan_output
from pipeline.transport import Endpoints, ProtocolError
from pipeline.transport.messages import (
    Acks,
    Credit,
    Failure,
    Hello,
    LineOutMessage,
    Ready,
    RemoteConfig,
    Reset,
    Results,
    Stop,
    WireMessage,
    read,
)
from pipeline.transport.security import CurveAuthenticator, serve_curve, start_authenticator
from workers.metrics import ScanMetrics
from workers.process import CONFIG_FILE, write_dropped_rows
from workers.writer import WRITE_FAILED

log = logging.getLogger(__name__)

#: How many of the newest results :attr:`ScanRunner.recent` keeps.
RECENT_RESULTS = 64


class ScanError(RuntimeError):
    """The scan cannot go on (a process died, or results stopped arriving)."""


@dataclass
class ScanSummary:
    """What happened to a scan: counts, rates and where the results are."""

    scan_id: str
    output_path: str
    submitted: int
    written_ok: int
    failed: int
    duplicates: int
    resent: int
    worker_restarts: int
    #: exposures already in the file of a resumed scan, not sent again
    skipped: int
    #: workers on other nodes that took part
    remote_workers: int
    wall_s: float
    exposures_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    failures: dict[int, str] = field(default_factory=dict)
    #: per stage: count, p50/p99 latency (see :mod:`workers.metrics`)
    stages: dict[str, dict] = field(default_factory=dict)
    #: CPU time of the feeder's process (all its threads) over ``wall_s``
    feeder_cpu_s: float = 0.0
    #: rows of a resumed file processed again: failed ones retried, or of files changed since
    redone: int = 0
    #: rows of a resumed file whose frame's file is no longer among the scan's files (kept)
    removed: int = 0
    #: times the results writer exited during the scan and was started again on the file
    writer_restarts: int = 0


@dataclass(frozen=True)
class WriterRestarted:
    """The results writer exited during a scan (``code``: its exit code, negative for a
    signal) and was started again on the file; ``resent`` exposures not acknowledged were
    sent again. ``restarts`` of at most ``max_restarts`` so far."""

    code: int | None
    restarts: int
    resent: int
    max_restarts: int

    def describe(self) -> str:
        """One line for a log or an event."""
        return (
            f"the results writer exited with code {self.code} and was started again on the "
            f"file ({self.restarts} of at most {self.max_restarts}); {self.resent} exposures "
            "not acknowledged were sent again"
        )


#: Below this much free space on the output file system, a scan error says the disk is full.
LOW_DISK_BYTES = 64 * 2**20


def _disk_space_note(folder: Path) -> str:
    """A sentence for an error message when ``folder``'s file system is (nearly) full: then
    the log files, on the same disk, may say nothing."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    if free >= LOW_DISK_BYTES:
        return ""
    return (
        f"the output file system is full ({free / 2**20:.1f} MiB free at {folder}): free space "
        "and resume the scan; every acknowledged exposure is in the file; "
    )


def _note(log: Path, line: str) -> None:
    """Add ``line`` to a child's log, which may be on a full disk: then it is lost."""
    with contextlib.suppress(OSError), open(log, "a") as handle:
        handle.write(line + "\n")


def line_out_message(exposure: Exposure, line_out: LineOut) -> LineOutMessage:
    """The message that takes an exposure's line-out to a worker."""
    return LineOutMessage(
        index=exposure.index,
        scan_id=exposure.scan_id,
        counts=line_out.counts,
        counts_sd=line_out.counts_sd,
        timestamp=exposure.timestamp,
        received_time=math.nan if exposure.received_at is None else exposure.received_at,
        truth=exposure.truth,
        source=exposure.metadata.get("source", ""),
        frame_id=exposure.metadata.get("frame_id", ""),
        normalization=line_out.normalization,
    )


def failure_message(exposure: Exposure, stage: str, error: str) -> Failure:
    """The failure record of an exposure that never reached a worker."""
    return Failure(
        index=exposure.index,
        stage=stage,
        error=error,
        scan_id=exposure.scan_id,
        timestamp=exposure.timestamp,
        received_time=math.nan if exposure.received_at is None else exposure.received_at,
        truth=exposure.truth,
        source=exposure.metadata.get("source", ""),
        frame_id=exposure.metadata.get("frame_id", ""),
    )


def _process_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


@dataclass(frozen=True)
class RecentResult:
    """One exposure as the writer acknowledged it, for live views: status, the time from
    hand-over to written, and (when ``ok``) posterior mean, sd and 5/50/95% quantiles per
    parameter (``PARAMETER_NAMES`` order)."""

    index: int
    status: str
    latency_s: float
    mean: tuple[float, ...] = ()
    sd: tuple[float, ...] = ()
    quantiles: tuple[tuple[float, ...], ...] = ()
    error: str = ""
    #: the posterior-predictive check (:mod:`pipeline.physics.quality`)
    predictive_z: float = float("nan")

    @property
    def flagged(self) -> bool:
        """The grating model cannot explain this line-out."""
        return self.predictive_z > Z_THRESHOLD

    def describe(self) -> str:
        """One line, e.g. ``12: pitch_nm 100.2 [99.8, 100.6], ...`` (median [5%, 95%])."""
        if self.status != "ok":
            return f"{self.index}: {self.status}: {self.error}"
        parts = [
            f"{name} {q50:.4g} [{q05:.4g}, {q95:.4g}]"
            for name, q05, q50, q95 in zip(PARAMETER_NAMES, *self.quantiles, strict=True)
        ]
        line = f"{self.index}: " + ", ".join(parts)
        if self.flagged:
            line += f" FLAGGED (z = {self.predictive_z:.0f}): not explained by a grating"
        return line


@dataclass
class _Child:
    name: str
    number: int
    process: subprocess.Popen
    log: Path

    def tail(self, n: int = 20) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])


@dataclass
class _Worker:
    """An inference worker as the feeder sees it: its socket identity, process, credits and
    the exposures it holds (sent, not yet acknowledged by the writer)."""

    identity: bytes
    number: int
    pid: int
    credits: int
    last_seen: float
    holding: set[int] = field(default_factory=set)
    #: the credits it asked for when it started (twice its largest batch), at most twice the
    #: largest batch a worker may take
    capacity: int = 0
    #: a worker on another node (``host``), not a child of the feeder
    remote: bool = False
    host: str = ""


class ScanRunner:
    """Feeds one scan through the pipeline's processes (a context manager).

    With ``resume``, an existing results file of the same scan is continued: the writer keeps
    its complete rows, and exposures already in it are skipped when submitted again, by frame
    identity (:mod:`pipeline.store.resume`; ``manifest``, the source's files now, lets it redo
    the rows of changed files and report those of removed ones; ``retry_failed`` redoes failed
    rows). A results file made with another configuration or model is refused (``ValueError``).

    The results file is locked (:class:`pipeline.store.lock.ResultsLock`) from :meth:`start`
    until the writer has exited: a second run on it is refused with
    :class:`~pipeline.store.lock.ResultsBusy`. When :attr:`complete` is set by the end of the
    scan (the source gave everything it had), the file is marked complete once the writer
    has closed it.
    ``on_result`` is called with each exposure as the writer acknowledges it (in this
    thread, so it must be quick: a live view's bookkeeping, not its drawing).

    The writer and the local workers run in sessions of their own: a signal to this process's
    group (Ctrl-C, or Prefect cancelling a run) reaches only this process, which then stops
    them in order, so that the results file is closed complete. They also stop when this
    process dies.
    """

    def __init__(
        self,
        config: PipelineConfig,
        resume: bool = False,
        on_result: Callable[[RecentResult], None] | None = None,
        on_writer_restart: Callable[[WriterRestarted], None] | None = None,
        manifest: Mapping[str, FileStamp] | None = None,
        retry_failed: bool = False,
    ) -> None:
        self.config = config
        self.resume = resume
        self.on_result = on_result
        self.on_writer_restart = on_writer_restart
        self.manifest = manifest
        self.retry_failed = retry_failed
        self.plan: ResumePlan | None = None
        #: set by the caller when the source gave all it had: the file is marked complete
        self.complete = False
        self._lock = ResultsLock(config.output_path)
        self._n_skipped = 0
        try:  # a geometry the model was not trained for stops here, before any process
            self.integrator = checked_integrator(config)
        except GeometryMismatch as error:
            raise ScanError(str(error)) from None
        self._children: list[_Child] = []
        self._workers: dict[bytes, _Worker] = {}
        self._unacknowledged: dict[int, list] = {}  # index -> its line-out message
        self._unwritten_failures: dict[int, list] = {}  # index -> its failure record
        limits = (config.inference.batch_limit(device) for device in ("cpu", "cuda"))
        self._largest_capacity = 2 * max(limits)  # the most a worker may keep in flight
        self._queue: deque[int] = deque()  # exposures waiting for a worker's credit
        self._sent_at: dict[int, float] = {}
        self._latency_s: dict[int, float] = {}
        self._status: dict[int, str] = {}
        self._ready: set[str] = set()
        self._ready_pids: set[int] = set()
        self.failures: dict[int, str] = {}
        self.duplicates = 0
        self.resent = 0
        self.worker_restarts = 0
        self.writer_restarts = 0
        self.malformed = 0
        self._greeted: dict[bytes, int] = {}  # remote workers sent the config: their numbers
        self._remote_config: RemoteConfig | None = None  # what remote workers are sent
        self.remote_workers = 0
        self._next_remote_number = config.n_workers  # remote workers are numbered after local ones
        self.remote_endpoint: str | None = None
        self._authenticator: CurveAuthenticator | None = None
        self.run_dir: Path | None = None
        self.context: zmq.Context | None = None
        self._monitors: dict[zmq.Socket, str] = {}
        self.metrics = ScanMetrics()
        self.recent: deque[RecentResult] = deque(maxlen=RECENT_RESULTS)
        self._started = time.perf_counter()
        self._cpu_started = _process_cpu_s()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> ScanRunner:
        """Lock the results file, check it (:func:`~pipeline.store.resume.plan_output`), bind
        the sockets and start the writer and workers; a start that fails leaves no process,
        run directory, lock or new results file behind."""
        self._lock.acquire()
        new_file = False
        try:
            self.plan = plan_output(self.config, self.resume, self.manifest, self.retry_failed)
            new_file = self.plan is None
            self._start_processes()
        except BaseException:
            self.stop(timeout_s=5.0)
            if new_file:  # a file this start made holds no row: not left to block a rerun
                self.config.output_path.unlink(missing_ok=True)
                making(self.config.output_path).unlink(missing_ok=True)
            self._lock.release()
            raise
        self._started = time.perf_counter()
        self._cpu_started = _process_cpu_s()
        return self

    def _start_processes(self) -> None:
        config = self.config
        self.run_dir = make_scratch_dir("binn-")  # short: ipc paths are limited
        (self.run_dir / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
        if self.plan is not None:
            write_dropped_rows(self.run_dir, self.plan.dropped)
        self.endpoints = Endpoints.resolve(config.transport, self.run_dir)
        self.log_dir = config.output_dir / "logs" / config.scan_id
        self.log_dir.mkdir(parents=True, exist_ok=True)

        self.context = zmq.Context()
        self.work = self.context.socket(zmq.ROUTER)
        self.work.setsockopt(zmq.LINGER, 0)
        self.work.setsockopt(zmq.MAXMSGSIZE, config.transport.max_message_bytes)
        self.work.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished worker is known at once
        self.work.setsockopt(zmq.SNDHWM, 0)  # bounded by the workers' credits
        self.work.setsockopt(zmq.RCVHWM, 0)
        self.work.bind(self.endpoints.work)
        self.acks = self.context.socket(zmq.PULL)
        self.acks.setsockopt(zmq.MAXMSGSIZE, config.transport.max_message_bytes)
        self.acks.bind(self.endpoints.acks)
        self.control = self.context.socket(zmq.PUB)
        self.control.bind(self.endpoints.control)
        # failure records, and remote workers' results, straight to the writer
        self.to_writer = self.context.socket(zmq.PUSH)
        self.to_writer.setsockopt(zmq.LINGER, 5000)
        self.to_writer.connect(self.endpoints.results)
        self._poller = zmq.Poller()  # workers' messages and the writer's acknowledgements
        self._poller.register(self.work, zmq.POLLIN)
        self._poller.register(self.acks, zmq.POLLIN)
        self._monitors = {  # disconnected peers, for the log
            self.work.get_monitor_socket(zmq.EVENT_DISCONNECTED): "work",
            self.acks.get_monitor_socket(zmq.EVENT_DISCONNECTED): "acks",
        }
        for monitor in self._monitors:
            self._poller.register(monitor, zmq.POLLIN)

        if config.transport.remote_work is not None:
            self._bind_remote_work(self.context, config.transport.remote_work)
        self._spawn(
            "writer",
            "workers.writer",
            0,
            *(["--resume"] if self.plan is not None else []),
            pass_fds=(self._lock.fd,),  # the writer holds the file's lock while it lives
        )
        for number in range(config.n_workers):
            self._spawn(f"worker-{number}", "workers.inference", number)
        self._wait_ready()

    def _bind_remote_work(self, context: zmq.Context, endpoint: str) -> None:
        """Bind the work socket a second time, on ``endpoint``, for remote workers: with CURVE
        when keys are configured, and ZeroMQ's heartbeats; read the model files they will be
        sent."""
        transport = self.config.transport
        if transport.curve_secret_key is not None and transport.curve_authorized_keys is not None:
            self._authenticator = start_authenticator(context, transport.curve_authorized_keys)
            serve_curve(self.work, transport.curve_secret_key)
        interval_ms = int(1000 * transport.heartbeat_interval_s)
        self.work.setsockopt(zmq.HEARTBEAT_IVL, interval_ms)
        self.work.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(1000 * transport.worker_timeout_s))
        self.work.bind(endpoint)
        self.remote_endpoint = self.work.getsockopt_string(zmq.LAST_ENDPOINT)
        weights = resolve_model(self.config.inference.model)
        self._remote_config = RemoteConfig(
            config=self.config.model_dump_json(),
            worker_id=-1,  # each remote worker's number goes in when it is greeted
            model_sha256=read_card(weights)["weights_sha256"],
            weights=np.frombuffer(Path(weights).read_bytes(), np.uint8),
            card=np.frombuffer(card_path(Path(weights)).read_bytes(), np.uint8),
        )

    def _spawn(
        self, name: str, module: str, number: int, *options: str, pass_fds: tuple[int, ...] = ()
    ) -> None:
        log = self.log_dir / f"{name}.log"
        command = [
            sys.executable,
            "-m",
            module,
            "--run-dir",
            str(self.run_dir),
            "--id",
            str(number),
        ]
        with open(log, "a") as handle:  # a replaced worker's log goes on in the same file
            process = subprocess.Popen(
                [*command, *options],
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=pass_fds,
            )
        self._children.append(_Child(name, number, process, log))

    def _check_children(self) -> None:
        """Replace workers that exited or went silent; a writer that exited, or a worker that
        gave up (exit code > 0) before it was ready, ends the scan."""
        now = time.monotonic()
        timeout = self.config.transport.worker_timeout_s
        silent = set()
        for worker in list(self._workers.values()):
            if now - worker.last_seen <= timeout:
                continue
            if worker.remote:
                self._lose(worker, "went silent")
                self._send_to(worker.identity, Reset())
            else:
                silent.add(worker.pid)
        for child in list(self._children):
            code = child.process.poll()
            if code is None and child.process.pid not in silent:
                continue
            ready = child.process.pid in self._ready_pids
            writer = child.name == "writer"
            if (writer and (not ready or code == WRITE_FAILED)) or (
                code is not None and code > 0 and not ready
            ):
                # a process that gave up before it was ready (a results file that cannot be
                # written, a model file that does not load), or a writer that could not write
                # (a full disk): another would fail the same way. A worker's signal is not
                # its doing.
                raise ScanError(
                    f"{child.name} exited with code {code} during the scan; "
                    f"{_disk_space_note(self.config.output_dir)}"
                    f"last lines of {child.log}:\n{child.tail()}"
                )
            if writer:
                self._restart_writer(child, code)
            else:
                self._replace(
                    child, f"exited with code {code}" if code is not None else "went silent"
                )

    def _replace(self, child: _Child, why: str) -> None:
        """Hand a lost worker's exposures to the others and start a new worker in its place."""
        if self.worker_restarts >= self.config.transport.max_worker_restarts:
            raise ScanError(
                f"{child.name} {why}, and {self.worker_restarts} workers were replaced already; "
                f"last lines of {child.log}:\n{child.tail()}"
            )
        child.process.kill()
        child.process.wait()
        self._children.remove(child)
        for worker in list(self._workers.values()):
            if worker.pid == child.process.pid and not worker.remote:
                self._lose(worker, why)
        _note(child.log, f"--- {child.name} {why}; replaced by the feeder ---")
        self.worker_restarts += 1
        self._spawn(child.name, "workers.inference", child.number)

    def _restart_writer(self, writer: _Child, code: int | None) -> None:
        """Start a new writer on the results file in place of one that exited during the
        scan (it keeps the file's complete rows: ``ResultsWriter(resume=True)``), then send
        again every exposure not acknowledged, so the scan goes on. :class:`ScanError` when
        the writer was started again ``transport.max_writer_restarts`` times already, or the
        new one exits before it is ready (a full disk, a file it cannot read)."""
        why = f"the results writer exited with code {code} during the scan"
        if self.writer_restarts >= self.config.transport.max_writer_restarts:
            raise ScanError(
                f"{why}, and was started again {self.writer_restarts} times already; "
                f"{_disk_space_note(self.config.output_dir)}"
                f"last lines of {writer.log}:\n{writer.tail()}"
            )
        self._children.remove(writer)
        _note(writer.log, f"--- {why}; started again by the feeder on the file ---")
        self.writer_restarts += 1
        assert self.run_dir is not None  # (started)
        write_dropped_rows(self.run_dir, [])  # rows to redo were left out by the first writer
        self._ready.discard("writer-0")
        self._spawn("writer", "workers.writer", 0, "--resume", pass_fds=(self._lock.fd,))
        deadline = time.monotonic() + self.config.transport.startup_timeout_s
        while "writer-0" not in self._ready:
            (new,) = (child for child in self._children if child.name == "writer")
            if new.process.poll() is not None or time.monotonic() > deadline:
                state = (
                    f"exited with code {new.process.returncode}"
                    if new.process.poll() is not None
                    else f"was not ready after {self.config.transport.startup_timeout_s} s"
                )
                raise ScanError(
                    f"{why}, and the writer started again {state}; "
                    f"{_disk_space_note(self.config.output_dir)}"
                    f"last lines of {new.log}:\n{new.tail()}"
                )
            self._service(200)
        waiting = set(self._queue)
        lost = sorted(set(self._unacknowledged) - waiting - set(self._status))
        self._queue.extendleft(reversed(lost))
        for frames in self._unwritten_failures.values():
            self.to_writer.send_multipart(frames)
        resent = len(lost) + len(self._unwritten_failures)
        self.resent += resent
        self.metrics.record("resent", n=resent)
        restarted = WriterRestarted(
            code, self.writer_restarts, resent, self.config.transport.max_writer_restarts
        )
        log.warning("scan %s: %s", self.config.scan_id, restarted.describe())
        if self.on_writer_restart is not None:
            self.on_writer_restart(restarted)

    def _lose(self, worker: _Worker, why: str) -> None:
        """Forget a worker and queue the exposures it held to be sent to the others first."""
        if self._workers.pop(worker.identity, None) is None:
            return
        self._greeted.pop(worker.identity, None)  # a remote one starts over with a hello
        lost = sorted(worker.holding - set(self._status))
        self._queue.extendleft(reversed(lost))
        self.resent += len(lost)
        self.metrics.record("resent", n=len(lost))
        where = f" on {worker.host}" if worker.remote else ""
        log.warning(
            "scan %s: worker %d%s %s; %d exposures re-sent",
            self.config.scan_id,
            worker.number,
            where,
            why,
            len(lost),
        )

    def _send_to(self, identity: bytes, message: WireMessage) -> bool:
        """Send a command to one worker; False if it is no longer connected."""
        try:
            self.work.send_multipart([identity, *message.to_frames()], zmq.NOBLOCK)
        except zmq.ZMQError as error:
            if error.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                return False
            raise
        return True

    def _wait_ready(self) -> None:
        expected = {f"worker-{n}" for n in range(self.config.n_workers)} | {"writer-0"}
        deadline = time.monotonic() + self.config.transport.startup_timeout_s
        while not expected <= self._ready:
            if time.monotonic() > deadline:
                raise ScanError(
                    f"not ready after {self.config.transport.startup_timeout_s} s: "
                    f"{sorted(expected - self._ready)}"
                )
            self._service(200)
            self._check_children()

    def stop(
        self, timeout_s: float = 30.0, finish_batches: bool = True, n_exposures: int | None = None
    ) -> None:
        """Broadcast stop until every child has exited (then terminate stragglers); with
        ``n_exposures`` (the scan ended with that many), the writer marks the file complete
        when it holds them all. The writer gets 5 ms more per exposure written: it adds the
        NXcanSAS groups before it closes the file (about 0.3 ms each). Without
        ``finish_batches`` (Ctrl-C: leaving the ``with`` block on ``KeyboardInterrupt``), the
        local inference workers are killed at once instead of finishing the batch they hold
        (seconds on a CPU): those exposures were not acknowledged, and a resumed scan
        computes them again."""
        deadline = time.monotonic() + timeout_s + 0.005 * len(self._status)
        if not finish_batches:
            for child in self._children:
                if child.name.startswith("worker"):
                    child.process.kill()
        for identity in self._greeted:  # remote workers go back to waiting for a scan
            self._send_to(identity, Stop())
        while any(c.process.poll() is None for c in self._children) and time.monotonic() < deadline:
            self.control.send_multipart(Stop(n_exposures).to_frames())
            time.sleep(0.1)
        for child in self._children:
            if child.process.poll() is None:
                child.process.kill()
            child.process.wait()
        if self._authenticator is not None:
            self._authenticator.stop()
        if self._monitors:  # every socket was made
            for socket in (self.work, self.acks):
                socket.disable_monitor()
            for monitor in self._monitors:
                monitor.close(linger=0)
            self.work.close(linger=1000)  # the stops to remote workers go out
            for socket in (self.acks, self.control, self.to_writer):
                socket.close(linger=0)
            assert self.context is not None  # (it made the sockets)
            self.context.term()
        elif self.context is not None:  # a start that failed while binding
            self.context.destroy(linger=0)
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> ScanRunner:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        ended = exc_type is None and self.complete
        try:
            self.stop(
                finish_batches=not interrupted, n_exposures=self.rows_expected if ended else None
            )
            if ended:
                self._check_complete()
        finally:
            self._lock.release()

    def _check_complete(self) -> None:
        """:class:`ScanError` unless the writer marked the results file complete, with the
        scan's number of rows."""
        completion = read_completion(self.config.output_path)
        if completion is not None and completion.n_exposures == self.rows_expected:
            return
        (writer,) = (child for child in self._children if child.name == "writer")
        raise ScanError(
            f"{self.config.output_path} holds every exposure acknowledged, but was not marked "
            f"complete: the writer exited with code {writer.process.returncode}; last lines of "
            f"{writer.log}:\n{writer.tail()}"
        )

    @property
    def rows_expected(self) -> int:
        """Rows the results file holds once every submitted exposure is written: those a
        resumed file kept, and the submitted ones."""
        kept = self.plan.n_kept_rows if self.plan is not None else 0
        return kept + self.n_submitted

    # -- feeding and acknowledgements -----------------------------------------------------
    def _place(self, exposure: Exposure) -> Exposure | None:
        """``exposure`` with its index in the results file (a resumed scan's plan numbers
        new frames after the file's rows); ``None`` when its row is in the file already.
        ValueError if it was submitted before."""
        placed = self.plan.place(exposure) if self.plan is not None else exposure
        if placed is None:
            self._n_skipped += 1
            return None
        if placed.index in self._sent_at:
            raise ValueError(f"exposure {placed.index} was already submitted")
        return placed

    def submit(self, exposure: Exposure) -> None:
        """Integrate one exposure and send it on (blocks while too many are in flight)."""
        placed = self._place(exposure)
        if placed is None:
            return
        exposure = placed
        self._taken(exposure)
        if exposure.error is not None or exposure.frame is None:
            self._fail(exposure, "read", exposure.error or "the source delivered no frame")
            return
        start = time.perf_counter()
        shape_was_open = self.integrator.shape is None
        try:
            normalization = exposure_normalization(exposure, self.config.integration)
            line_out = self.integrator.integrate(
                exposure.frame, normalization, source=exposure.metadata.get("source")
            )
        except NoPixelInRange:  # the first frame made a geometry with no pixel on the grid
            self._check_first_geometry()
            raise
        except FrameError as error:
            if shape_was_open and self.integrator.shape is not None:
                self._check_first_geometry()
            self._fail(exposure, "integration", str(error))
            return
        if shape_was_open:
            self._check_first_geometry()
        self.metrics.record("integrated", time.perf_counter() - start)
        self._send(exposure, line_out)

    def _check_first_geometry(self) -> None:
        """:class:`ScanError` (one line) when the geometry that the first frame completed
        does not match the model's instrument (:func:`~pipeline.preflight.check_geometry`).

        Why here: a PONI that names no detector, with no mask, dark, flat or
        ``detector_shape`` (:func:`~pipeline.integration.frame_shape_is_open`; ``online``
        with a v1 PONI), leaves the frames' shape, and so the pixels of each q bin, unknown
        until the first frame, when the integrator is built; the preflight and
        :meth:`__init__` could not count them. The scan stops at that frame, before any
        line-out of this geometry reaches a model that was not trained for it."""
        try:
            check_model_geometry(self.integrator, self.config)
        except GeometryMismatch as error:
            raise ScanError(str(error)) from None

    def submit_line_out(self, exposure: Exposure, line_out: LineOut) -> None:
        """Send a line-out integrated elsewhere for ``exposure`` (its frame is not used)."""
        placed = self._place(exposure)
        if placed is None:
            return
        exposure = placed
        self._taken(exposure)
        self._send(exposure, line_out)

    def _taken(self, exposure: Exposure) -> None:
        """Count an exposure handed over, and note the time its latency counts from: for a
        frame of a live source, when the detector acquired it (``timestamp``, the detector's
        own time where its messages say), or when the pipeline took it from the socket
        (``received_at``) where that is earlier, so that frames waiting in the socket (while
        the workers start, or behind a slow integration) show it; the wait until hand-over
        is the ``received`` stage's latency. Archived frames count from now."""
        now = time.perf_counter()
        if exposure.received_at is None:
            self._sent_at[exposure.index] = now
            self.metrics.record("received")
            return
        waited_s = max(0.0, time.time() - min(exposure.timestamp, exposure.received_at))
        self._sent_at[exposure.index] = now - waited_s
        self.metrics.record("received", waited_s)

    def _send(self, exposure: Exposure, line_out: LineOut) -> None:
        """Keep the line-out until it is acknowledged, and send it when a worker has credit
        (waits while :meth:`_in_flight_limit` line-outs are in flight)."""
        self._unacknowledged[exposure.index] = line_out_message(exposure, line_out).to_frames()
        self._queue.append(exposure.index)
        limit = self._in_flight_limit()
        self._service(0)  # credits returned meanwhile
        self._dispatch()
        waiting_since = time.monotonic()
        while len(self._unacknowledged) >= limit:  # bounded memory: wait for the writer
            if self._service(200):
                waiting_since = time.monotonic()
            self._check_children()
            self._dispatch()
            if time.monotonic() - waiting_since > self.config.transport.result_timeout_s:
                raise ScanError(
                    f"no exposure written for {self.config.transport.result_timeout_s} s with "
                    f"{len(self._unacknowledged)} in flight and {len(self._workers)} workers "
                    "connected"
                )

    def _in_flight_limit(self) -> int:
        """Line-outs kept until the writer acknowledges them before :meth:`submit` waits:
        for each worker, ``transport.high_water_mark`` or its capacity (the credits it asked
        for at start, twice its largest batch, so a GPU worker's batches can fill),
        whichever is more."""
        most = self.config.transport.high_water_mark
        return max(most, sum(max(most, worker.capacity) for worker in self._workers.values()))

    def _fail(self, exposure: Exposure, stage: str, error: str) -> None:
        """A failure record for an exposure that never reached a worker, straight to the
        writer (kept until it is acknowledged: a writer started again gets it again)."""
        frames = failure_message(exposure, stage, error).to_frames()
        self._unwritten_failures[exposure.index] = frames
        self.to_writer.send_multipart(frames)

    def _dispatch(self) -> None:
        """Send waiting exposures to the workers that have credits, most credits first."""
        while self._queue:
            worker = max(self._workers.values(), key=lambda w: w.credits, default=None)
            if worker is None or worker.credits <= 0:
                return
            index = self._queue.popleft()
            if index in self._status:  # acknowledged meanwhile (a re-sent exposure)
                continue
            try:
                self.work.send_multipart(
                    [worker.identity, *self._unacknowledged[index]], zmq.NOBLOCK, copy=False
                )
            except zmq.ZMQError as error:
                if error.errno != zmq.EHOSTUNREACH:
                    raise
                self._queue.appendleft(index)
                self._lose(worker, "disconnected")
                continue
            worker.credits -= 1
            worker.holding.add(index)

    def _service(self, timeout_ms: int) -> int:
        """Handle what the workers and the writer sent (waiting up to ``timeout_ms`` for the
        first message); return how many exposures were newly acknowledged."""
        acknowledged = 0
        events = dict(self._poller.poll(timeout_ms))
        while events:
            if self.work in events:
                frames = self.work.recv_multipart(copy=False)
                with self._dropping_malformed("work"):
                    message = read([f.buffer for f in frames[1:]])
                    self._from_worker(frames[0].bytes, frames[1:], message)
            if self.acks in events:
                acks = self.acks.recv_multipart()
                with self._dropping_malformed("acks"):
                    acknowledged += self._from_writer(read(acks))
            for monitor, name in self._monitors.items():
                if monitor in events:
                    self._log_disconnect(name, recv_monitor_message(monitor))
            events = dict(self._poller.poll(0))
        return acknowledged

    def _log_disconnect(self, socket: str, event: Mapping[str, Any]) -> None:
        """Log a peer that disconnected, unless it is a remote worker whose CURVE key was just
        refused: the authenticator has logged that, with the worker's address."""
        authenticator = self._authenticator if socket == "work" else None
        if authenticator is not None and authenticator.take_refusal():
            return
        log.warning(
            "scan %s: a peer of the %s socket disconnected (%s): a process that exited, or a "
            "message larger than max_message_bytes (%d B)",
            self.config.scan_id,
            socket,
            event["endpoint"].decode(errors="replace"),
            self.config.transport.max_message_bytes,
        )

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

    def _from_worker(self, identity: bytes, frames: list, message: WireMessage) -> None:
        now = time.monotonic()
        if isinstance(message, Hello):
            self._greet(identity)
            return
        if isinstance(message, Ready):
            self._worker_ready(identity, message, now)
            return
        worker = self._workers.get(identity)
        if worker is None:
            if self.remote_endpoint is not None:  # a remote worker this feeder dropped, or
                self._greeted.pop(identity, None)  # one from an earlier scan: start over
                self._send_to(identity, Reset())
            return
        worker.last_seen = now
        if isinstance(message, Results | Failure) and worker.remote:  # for the writer
            self.to_writer.send_multipart(frames, copy=False)
        elif isinstance(message, Credit):
            worker.credits += message.credits
            if message.inferred:
                self.metrics.record("inferred", message.batch_s, message.inferred)

    def _worker_ready(self, identity: bytes, ready: Ready, now: float) -> None:
        """Count a worker that said it is ready (a local one only if it is one of this
        feeder's children) with the credits it asked for."""
        remote = self._greeted.get(identity) == ready.id
        if not remote and ready.pid not in {c.process.pid for c in self._children}:
            return  # a replaced worker's word
        if ready.credits is None:
            raise ProtocolError(f"worker {ready.id} said it is ready without credits")
        self._workers[identity] = _Worker(
            identity,
            ready.id,
            ready.pid,
            ready.credits,
            now,
            capacity=min(ready.credits, self._largest_capacity),
            remote=remote,
            host=ready.host,
        )
        if remote:
            self.remote_workers += 1
            log.info(
                "scan %s: remote worker %d joined from %s (%s)",
                self.config.scan_id,
                ready.id,
                ready.host,
                ready.device,
            )
        else:
            self._ready.add(ready.name)
            self._ready_pids.add(ready.pid)

    def _greet(self, identity: bytes) -> None:
        """Send a remote worker that said hello the scan's configuration and model files."""
        if self._remote_config is None or identity in self._greeted:
            return
        number = self._next_remote_number
        self._next_remote_number += 1
        self._greeted[identity] = number
        self._send_to(identity, replace(self._remote_config, worker_id=number))

    def _from_writer(self, message: WireMessage) -> int:
        if isinstance(message, Ready):
            self._ready.add(message.name)
            self._ready_pids.add(message.pid)
            return 0
        if not isinstance(message, Acks):
            return 0
        rows = zip(
            message.index.tolist(),
            message.status,
            message.error,
            message.duplicate.tolist(),
            message.mean.tolist(),
            message.sd.tolist(),
            message.quantiles.tolist(),
            message.predictive_z.tolist(),
            strict=True,
        )
        return sum(self._acknowledged(*row) for row in rows)

    def _acknowledged(
        self,
        index: int,
        status: str,
        error: str,
        duplicate: int,
        mean: list[float],
        sd: list[float],
        quantiles: list[list[float]],
        z: float,
    ) -> int:
        """Record that the writer stored exposure ``index``; 1 if that is news, else 0."""
        if index in self._status:
            self.duplicates += 1
            return 0
        if duplicate:  # stored by a writer that exited before it acknowledged the row
            self.duplicates += 1
        self._status[index] = str(status)
        self._latency_s[index] = time.perf_counter() - self._sent_at.get(index, np.nan)
        ok = status == "ok"
        result = RecentResult(
            index,
            self._status[index],
            self._latency_s[index],
            tuple(mean) if ok else (),
            tuple(sd) if ok else (),
            tuple(tuple(row) for row in quantiles) if ok else (),
            str(error),
            float(z),
        )
        self.recent.append(result)
        if self.on_result is not None:
            self.on_result(result)
        if not ok:
            self.failures[index] = str(error)
            self.metrics.record("failed")
        else:
            self.metrics.record("written", self._latency_s[index])
        self._unacknowledged.pop(index, None)
        self._unwritten_failures.pop(index, None)
        for worker in self._workers.values():
            worker.holding.discard(index)
        return 1

    def collect(self, timeout_ms: int = 0) -> int:
        """Handle waiting messages (after up to ``timeout_ms``), replace lost workers and send
        what waits for credits; return how many exposures were newly acknowledged."""
        acknowledged = self._service(timeout_ms)
        self._check_children()
        self._dispatch()
        return acknowledged

    @property
    def pids(self) -> list[int]:
        """Process ids of the writer and the inference workers."""
        return [child.process.pid for child in self._children]

    @property
    def in_flight(self) -> int:
        """Line-outs sent or waiting for a worker, not yet acknowledged by the writer."""
        return len(self._unacknowledged)

    @property
    def n_submitted(self) -> int:
        return len(self._sent_at)

    @property
    def n_done(self) -> int:
        """Exposures acknowledged as written (ok or failed)."""
        return len(self._status)

    def wait(self, on_progress: Callable[[int, int], None] | None = None) -> ScanSummary:
        """Wait until every submitted exposure is acknowledged; raise :class:`ScanError` if
        none arrives for ``transport.result_timeout_s``."""
        last_progress = time.monotonic()
        while self.n_done < self.n_submitted:
            if self.collect(timeout_ms=500):
                last_progress = time.monotonic()
                if on_progress:
                    on_progress(self.n_done, self.n_submitted)
            elif time.monotonic() - last_progress > self.config.transport.result_timeout_s:
                missing = sorted(set(self._sent_at) - set(self._status))
                raise ScanError(f"no result for {len(missing)} exposures, e.g. {missing[:10]}")
        return self.summary()

    def summary(self) -> ScanSummary:
        # from the start, or from the first frame of a live source acquired before it
        wall = time.perf_counter() - min([self._started, *self._sent_at.values()])
        latencies = np.array(list(self._latency_s.values())) * 1e3
        return ScanSummary(
            scan_id=self.config.scan_id,
            output_path=str(self.config.output_path),
            submitted=self.n_submitted,
            written_ok=self.n_done - len(self.failures),
            failed=len(self.failures),
            duplicates=self.duplicates,
            resent=self.resent,
            worker_restarts=self.worker_restarts,
            writer_restarts=self.writer_restarts,
            skipped=self._n_skipped,
            remote_workers=self.remote_workers,
            wall_s=wall,
            exposures_per_s=self.n_done / wall if wall > 0 else 0.0,
            latency_p50_ms=float(np.percentile(latencies, 50)) if latencies.size else np.nan,
            latency_p99_ms=float(np.percentile(latencies, 99)) if latencies.size else np.nan,
            failures=dict(self.failures),
            stages=self.metrics.summary(),
            feeder_cpu_s=_process_cpu_s() - self._cpu_started,
            redone=self.plan.n_changed if self.plan is not None else 0,
            removed=len(self.plan.removed) if self.plan is not None else 0,
        )
