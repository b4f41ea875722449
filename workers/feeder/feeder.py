"""Run one scan: start the writer and inference workers, integrate and send frames, collect
acknowledgements, stop everything cleanly.

:class:`Feeder` is the feeder process of DESIGN.md section 2, composed of the parts of
:mod:`workers.feeder`: :class:`~workers.feeder.integration.Integration` (exposure to line-out
or failure record), :class:`~workers.feeder.ledger.Ledger` (what is in flight, work by
credit), :class:`~workers.feeder.sockets.FeederSockets`,
:class:`~workers.feeder.supervisor.Supervisor` (child processes),
:class:`~workers.feeder.remote_work.RemoteWork` (workers on other nodes) and
:class:`~workers.feeder.metrics.ScanMetrics`. The line-outs in flight are bounded (per
worker ``transport.high_water_mark`` or twice its largest batch, whichever is more): beyond
that, :meth:`Feeder.submit` waits. The newest
:data:`~workers.feeder.reports.RECENT_RESULTS` acknowledgements are kept in
:attr:`Feeder.recent` for live views (older ones are only in the file).

It is plain Python (no Prefect): the flows in ``flows/`` call it.

Example:
    >>> from pipeline.config import PipelineConfig
    >>> from pipeline.sources import SimulatedDetector
    >>> config = PipelineConfig(scan_id="doc", n_workers=1, output_dir=tmp)  # doctest: +SKIP
    >>> with Feeder(config) as feeder:                                       # doctest: +SKIP
    ...     for exposure in SimulatedDetector(config.integration).scan("doc", 4).exposures():
    ...         feeder.submit(exposure)
    ...     summary = feeder.wait()
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import zmq

from pipeline.config import PipelineConfig
from pipeline.exposure import Exposure, LineOut
from pipeline.integration import LineOutIntegrator
from pipeline.scratch import make_scratch_dir
from pipeline.sources.identity import FileStamp
from pipeline.store.lock import ResultsLock
from pipeline.store.results import making
from pipeline.store.resume import ResumePlan, plan_output
from pipeline.transport import Endpoints, ProtocolError
from pipeline.transport.messages import (
    Acks,
    Credit,
    Failure,
    FrameMessage,
    Hello,
    Ready,
    Results,
    Stop,
    WireMessage,
)
from workers.feeder.integration import (
    Integration,
    Outcome,
    Unusable,
    failure_message,
    line_out_message,
)
from workers.feeder.ledger import Frames, Ledger, Worker, WorkerState
from workers.feeder.metrics import ScanMetrics
from workers.feeder.remote_work import RemoteWork
from workers.feeder.reports import (
    RECENT_RESULTS,
    RecentResult,
    ScanError,
    ScanSummary,
    WriterRestarted,
)
from workers.feeder.sockets import FeederSockets
from workers.feeder.supervisor import Child, Supervisor
from workers.process import CONFIG_FILE, write_dropped_rows

log = logging.getLogger(__name__)


def _process_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


class Feeder:
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
    thread, so it must be quick: a live view's bookkeeping, not its drawing), and
    ``on_writer_restart`` with each :class:`WriterRestarted`.

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
        #: set by the caller when the source gave all it had: the file is marked complete
        self.complete = False
        self._lock = ResultsLock(config.output_path)
        self.metrics = ScanMetrics()
        self.integration = Integration(config, self.metrics)  # ScanError: another geometry
        limits = (config.batch_limit(device) for device in ("cpu", "cuda"))
        # the most a worker may keep in flight: twice its largest batch
        self.ledger = Ledger(config.transport.high_water_mark, 2 * max(limits))
        self.supervisor = Supervisor(config, self._lock)
        self.remote: RemoteWork | None = None
        self.run_dir: Path | None = None
        self.context: zmq.Context | None = None
        self._sockets: FeederSockets | None = None
        self.recent: deque[RecentResult] = deque(maxlen=RECENT_RESULTS)
        #: exposures written with a quality flag
        self.flagged = 0
        self._started = time.perf_counter()
        self._cpu_started = _process_cpu_s()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Feeder:
        """Lock the results file, check it (:func:`~pipeline.store.resume.plan_output`), bind
        the sockets and start the writer and workers; a start that fails leaves no process,
        run directory, lock or new results file behind."""
        self._lock.acquire()
        new_file = False
        try:
            plan = plan_output(self.config, self.resume, self.manifest, self.retry_failed)
            self.integration.plan = plan
            new_file = plan is None
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
        self.context = zmq.Context()
        self._sockets = FeederSockets(self.context, self.endpoints, config, self._key_refused)
        if config.transport.remote_work is not None:
            self.remote = RemoteWork(config)
            self.remote.bind(self.context, self._sockets.work)
        self.supervisor.start(self.run_dir, resume=self.plan is not None)
        self._sockets.watch(self.integration.fds, self.integration.collect)
        self.integration.start(config.transport.startup_timeout_s)  # beside the workers' start
        startup_s = config.worker_startup_s()
        deadline = time.monotonic() + startup_s
        while not_ready := self.supervisor.not_ready():
            if time.monotonic() > deadline:
                compiling = " (compiling their sampler)" if config.inference.compile else ""
                raise ScanError(f"not ready after {startup_s:g} s{compiling}: {not_ready}")
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
        deadline = time.monotonic() + timeout_s + 0.005 * self.n_done
        self.integration.close()
        if not finish_batches:
            self.supervisor.kill_workers()
        if self.remote is not None:  # remote workers go back to waiting for a scan
            self.remote.stop()
        self.supervisor.stop(
            deadline, lambda: self.sockets.control.send_multipart(Stop(n_exposures).to_frames())
        )
        if self.remote is not None:
            self.remote.close()
        if self._sockets is not None:  # every socket was made
            self._sockets.close()
            assert self.context is not None  # (it made the sockets)
            self.context.term()
        elif self.context is not None:  # a start that failed while binding
            self.context.destroy(linger=0)
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Feeder:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        ended = exc_type is None and self.complete
        try:
            self.stop(
                finish_batches=not interrupted, n_exposures=self.rows_expected if ended else None
            )
            if ended:
                self.supervisor.check_complete(self.rows_expected)
        finally:
            self._lock.release()

    @property
    def sockets(self) -> FeederSockets:
        """The feeder's sockets, once :meth:`start` has made them."""
        if self._sockets is None:
            raise RuntimeError(f"the feeder of scan {self.config.scan_id} was not started")
        return self._sockets

    @property
    def plan(self) -> ResumePlan | None:
        """A resumed scan's plan (:mod:`pipeline.store.resume`), once started; else ``None``."""
        return self.integration.plan

    @property
    def integrator(self) -> LineOutIntegrator:
        """The scan's pyFAI integrator."""
        return self.integration.integrator

    @property
    def rows_expected(self) -> int:
        """Rows the results file holds once every submitted exposure is written: those a
        resumed file kept, and the submitted ones."""
        kept = self.plan.n_kept_rows if self.plan is not None else 0
        return kept + self.n_submitted

    # -- feeding -----------------------------------------------------------------------------
    def submit(self, exposure: Exposure) -> None:
        """Integrate one exposure (here, in an integrator process, or on the workers, which
        are then sent its frame) and send it on (blocks while every integrator process is
        busy, or too many are in flight); ValueError if it was submitted before."""
        placed = self.integration.place(exposure)
        if placed is None:
            return
        self._taken(placed)
        since, timeout_s = time.monotonic(), self.config.transport.result_timeout_s
        while not self.integration.has_room:  # every integrator process holds its frames
            self.collect(timeout_ms=200)
            if time.monotonic() - since > timeout_s:
                held = self.integration.pending
                raise ScanError(
                    f"no integrator process finished a frame in {timeout_s} s ({held} held)"
                )
        self._forward([(placed, self.integration.begin(placed))])

    def _forward(self, integrated: list[tuple[Exposure, Outcome | None]]) -> None:
        """Send on these line-outs (or frames, to workers that integrate) and those the
        integrator processes finished, and the failure records of exposures without one
        (``None``: an integrator process has it)."""
        for exposure, result in [*integrated, *self.integration.take_finished()]:
            if isinstance(result, Unusable):
                self._fail(exposure, result.stage, result.error)
            elif isinstance(result, FrameMessage):  # for workers that integrate
                self._send(exposure.index, result.to_frames())
            elif result is not None:
                self._send(exposure.index, line_out_message(exposure, result).to_frames())

    def submit_line_out(self, exposure: Exposure, line_out: LineOut) -> None:
        """Send a line-out integrated elsewhere for ``exposure`` (its frame is not used)."""
        placed = self.integration.place(exposure)
        if placed is None:
            return
        self._taken(placed)
        self._send(placed.index, line_out_message(placed, line_out).to_frames())

    def _taken(self, exposure: Exposure) -> None:
        """Count an exposure handed over, and note the time its latency counts from: for a
        frame of a live source, when the detector acquired it (``timestamp``, the detector's
        own time where its messages say), or when the pipeline took it from the socket
        (``received_at``) where that is earlier, so that frames waiting in the socket (while
        the workers start, or behind a slow integration) show it; the wait until hand-over
        is the ``received`` stage's latency. Archived frames count from now."""
        now = time.perf_counter()
        if exposure.received_at is None:
            self.ledger.take(exposure.index, now)
            self.metrics.record("received")
            return
        waited_s = max(0.0, time.time() - min(exposure.timestamp, exposure.received_at))
        self.ledger.take(exposure.index, now - waited_s)
        self.metrics.record("received", waited_s)

    def _send(self, index: int, frames: Frames) -> None:
        """Keep the message for a worker (a line-out, or a frame where the workers
        integrate) until its exposure is acknowledged, and send it when a worker has credit
        (waits while :meth:`Ledger.in_flight_limit` of them are in flight)."""
        self.ledger.hold_line_out(index, frames)
        limit = self.ledger.in_flight_limit()
        self._service(0)  # credits returned meanwhile
        self._dispatch()
        waiting_since = time.monotonic()
        while self.ledger.in_flight >= limit:  # bounded memory: wait for the writer
            if self._service(200):
                waiting_since = time.monotonic()
            self._check_children()
            self._dispatch()
            if time.monotonic() - waiting_since > self.config.transport.result_timeout_s:
                raise ScanError(
                    f"no exposure written for {self.config.transport.result_timeout_s} s with "
                    f"{self.ledger.in_flight} in flight and {len(self.ledger.workers)} workers "
                    "connected"
                )

    def _fail(self, exposure: Exposure, stage: str, error: str) -> None:
        """A failure record for an exposure that never reached a worker, straight to the
        writer (kept until it is acknowledged: a writer started again gets it again)."""
        frames = failure_message(exposure, stage, error).to_frames()
        self.ledger.hold_failure(exposure.index, frames)
        self.sockets.to_writer.send_multipart(frames)

    def _dispatch(self) -> None:
        """Send waiting exposures to the workers that have credits, most credits first."""
        while (sending := self.ledger.next_send()) is not None:
            try:
                self.sockets.work.send_multipart(
                    [sending.worker.identity, *sending.frames], zmq.NOBLOCK, copy=False
                )
            except zmq.ZMQError as error:
                if error.errno != zmq.EHOSTUNREACH:
                    raise
                self._lose(sending.worker, "disconnected")  # its exposures first, then this
                continue
            self.ledger.sent(sending.worker, sending.index)

    # -- what arrives ------------------------------------------------------------------------
    def _service(self, timeout_ms: int) -> int:
        """Handle what the workers and the writer sent (waiting up to ``timeout_ms`` for the
        first message); return how many exposures were newly acknowledged."""
        return self.sockets.service(timeout_ms, self._from_worker, self._from_writer)

    def _key_refused(self) -> bool:
        return self.remote is not None and self.remote.take_refusal()

    def _from_worker(self, identity: bytes, frames: list, message: WireMessage) -> None:
        now = time.monotonic()
        if isinstance(message, Hello):
            if self.remote is not None:
                self.remote.greet(identity)
            return
        if isinstance(message, Ready):
            self._worker_ready(identity, message, now)
            return
        worker = self.ledger.heard_from(identity, now)
        if worker is None:
            if self.remote is not None:  # a remote worker this feeder dropped, or one from
                self.remote.reset(identity)  # an earlier scan: start over
            return
        if isinstance(message, Results | Failure) and worker.remote:  # for the writer
            self.sockets.to_writer.send_multipart(frames, copy=False)
        elif isinstance(message, Credit):
            self.ledger.credit(identity, message.credits)
            if message.inferred:
                self.metrics.record("inferred", message.batch_s, message.inferred)
                if self.integration.on_workers:  # (in the same batches)
                    self.metrics.record("integrated", message.batch_s, message.inferred)

    def _worker_ready(self, identity: bytes, ready: Ready, now: float) -> None:
        """Count a worker that said it is ready (a local one only if it is one of this
        feeder's children) with the credits it asked for."""
        remote = self.remote is not None and self.remote.greeted_as(identity, ready.id)
        if not remote and not self.supervisor.is_child(ready.pid):
            return  # a replaced worker's word
        if ready.credits is None:
            raise ProtocolError(f"worker {ready.id} said it is ready without credits")
        self.ledger.join(
            identity, ready.id, ready.pid, ready.credits, now, remote=remote, host=ready.host
        )
        if self.remote is not None and remote:
            self.remote.join(ready)
        else:
            self.supervisor.mark_ready(ready.name, ready.pid)

    def _from_writer(self, message: WireMessage) -> int:
        if isinstance(message, Ready):
            self.supervisor.mark_ready(message.name, message.pid)
            return 0
        if not isinstance(message, Acks):
            return 0
        results = self.ledger.acknowledge_block(message, time.perf_counter())
        for result in results:
            self.recent.append(result)
            if self.on_result is not None:
                self.on_result(result)
            if result.status == "ok":
                self.metrics.record("written", result.latency_s)
                self.flagged += result.flagged
            else:
                self.metrics.record("failed")
        return len(results)

    # -- losses ------------------------------------------------------------------------------
    def _check_children(self) -> None:
        """Replace workers that exited or went silent, drop remote ones that went silent,
        start the writer again; a process whose loss ends the scan raises :class:`ScanError`."""
        silent = set()
        for worker in self.ledger.silent(time.monotonic(), self.config.transport.worker_timeout_s):
            if self.remote is not None and worker.remote:
                self._lose(worker, "went silent")
                self.remote.reset(worker.identity)
            else:
                silent.add(worker.pid)
        for child, code in self.supervisor.lost_children(silent):
            if child.name == "writer":
                self._restart_writer(child, code)
                continue
            why = f"exited with code {code}" if code is not None else "went silent"
            self.supervisor.replace_worker(child, why)
            for worker in list(self.ledger.workers.values()):
                if worker.pid == child.process.pid and not worker.remote:
                    self._lose(worker, why)

    def _restart_writer(self, writer: Child, code: int | None) -> None:
        """Start a new writer on the results file in place of one that exited during the
        scan, then send again every exposure not acknowledged, so the scan goes on."""
        self.supervisor.restart_writer(writer, code, self._service)
        n_line_outs, records = self.ledger.resend_unwritten()
        for frames in records:
            self.sockets.to_writer.send_multipart(frames)
        resent = n_line_outs + len(records)
        self.metrics.record("resent", n=resent)
        restarted = WriterRestarted(
            code, self.writer_restarts, resent, self.config.transport.max_writer_restarts
        )
        log.warning("scan %s: %s", self.config.scan_id, restarted.describe())
        if self.on_writer_restart is not None:
            self.on_writer_restart(restarted)

    def _lose(self, worker: Worker, why: str) -> None:
        """Forget a worker and queue the exposures it held to be sent to the others first."""
        lost = self.ledger.lose(worker.identity)
        if lost is None:
            return
        if self.remote is not None:  # a remote one starts over with a hello
            self.remote.forget(worker.identity)
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

    # -- progress and views ------------------------------------------------------------------
    def collect(self, timeout_ms: int = 0) -> int:
        """Handle waiting messages (after up to ``timeout_ms``), replace lost workers and send
        what waits for credits; return how many exposures were newly acknowledged."""
        acknowledged = self._service(timeout_ms)
        self._check_children()
        self._forward([])
        self._dispatch()
        return acknowledged

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
                missing = self.ledger.missing()
                raise ScanError(f"no result for {len(missing)} exposures, e.g. {missing[:10]}")
        return self.summary()

    def summary(self) -> ScanSummary:
        """The scan so far: counts, rates, latencies, stages."""
        # from the start, or from the first frame of a live source acquired before it
        wall = time.perf_counter() - min([self._started, *self.ledger.handed_over_s.values()])
        latencies = np.array(list(self.ledger.latencies_s.values())) * 1e3
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
            skipped=self.integration.skipped,
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
            flagged=self.flagged,
        )

    @property
    def n_submitted(self) -> int:
        """Exposures handed over (not those a resumed file held already)."""
        return len(self.ledger.handed_over_s)

    @property
    def n_done(self) -> int:
        """Exposures acknowledged as written (ok or failed)."""
        return len(self.ledger.acknowledged)

    @property
    def in_flight(self) -> int:
        """Line-outs sent or waiting for a worker, not yet acknowledged by the writer."""
        return self.ledger.in_flight

    @property
    def acknowledged(self) -> Mapping[int, str]:
        """Status of each exposure the writer acknowledged, in the order acknowledged."""
        return self.ledger.acknowledged

    @property
    def failures(self) -> dict[int, str]:
        """The error of each exposure acknowledged as failed."""
        return self.ledger.failures

    @property
    def duplicates(self) -> int:
        """Acknowledgements of exposures written already (computed twice, stored once)."""
        return self.ledger.duplicates

    @property
    def resent(self) -> int:
        """Exposures sent again: a lost worker's, or those not acknowledged by a writer that
        exited."""
        return self.ledger.resent

    @property
    def malformed(self) -> int:
        """Messages dropped because they did not follow the wire format or lacked a field."""
        return self._sockets.malformed if self._sockets is not None else 0

    @property
    def workers(self) -> tuple[WorkerState, ...]:
        """The workers connected now: their credits and the exposures each holds."""
        return tuple(worker.state() for worker in self.ledger.workers.values())

    @property
    def pids(self) -> list[int]:
        """Process ids of the writer and the inference workers, in the order started."""
        return [child.process.pid for child in self.supervisor.children]

    @property
    def children(self) -> dict[str, int]:
        """Process id of each child by name: ``writer``, ``worker-0``, ``worker-1``, ..."""
        return {child.name: child.process.pid for child in self.supervisor.children}

    @property
    def worker_restarts(self) -> int:
        """Local workers replaced."""
        return self.supervisor.worker_restarts

    @property
    def writer_restarts(self) -> int:
        """Times the results writer was started again on the file."""
        return self.supervisor.writer_restarts

    @property
    def remote_endpoint(self) -> str | None:
        """The address remote workers connect to (``transport.remote_work`` once bound)."""
        return self.remote.endpoint if self.remote is not None else None

    @property
    def remote_workers(self) -> int:
        """Remote workers that joined the scan."""
        return self.remote.joined if self.remote is not None else 0

    @property
    def greeted_workers(self) -> tuple[int, ...]:
        """Numbers of the remote workers sent the scan's configuration, not dropped since."""
        return self.remote.greeted if self.remote is not None else ()
