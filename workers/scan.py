"""Run one scan: start the writer and inference workers, integrate and send frames, collect
acknowledgements, stop everything cleanly.

:class:`ScanRunner` is the feeder process of DESIGN.md section 2: it owns the scan's pyFAI
integrator (one per process), binds the ``work``, ``acks`` and ``control`` endpoints, and
starts ``python -m workers.writer`` and ``python -m workers.inference`` as child processes
whose logs go to ``OUTPUT_DIR/logs/SCAN_ID/``. A frame that cannot be integrated becomes a
failure record sent straight to the writer, so the file has a row for every exposure.

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

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from pipeline.config import PipelineConfig
from pipeline.exposure import Exposure
from pipeline.integration import FrameError, LineOutIntegrator, exposure_normalization
from pipeline.transport import Endpoints, decode, encode
from workers.process import CONFIG_FILE


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
    wall_s: float
    exposures_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    failures: dict[int, str] = field(default_factory=dict)


@dataclass
class _Child:
    name: str
    process: subprocess.Popen
    log: Path

    def tail(self, n: int = 20) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])


class ScanRunner:
    """Feeds one scan through the pipeline's processes (a context manager)."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.integrator = LineOutIntegrator(config.integration, config.grid.grid())
        self._children: list[_Child] = []
        self._sent_at: dict[int, float] = {}
        self._latency_s: dict[int, float] = {}
        self._status: dict[int, str] = {}
        self.failures: dict[int, str] = {}
        self.duplicates = 0
        self._started = time.perf_counter()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> ScanRunner:
        config = self.config
        if config.output_path.exists():
            raise FileExistsError(f"results file already exists: {config.output_path}")
        self.run_dir = Path(tempfile.mkdtemp(prefix="binn-"))  # short: ipc paths are limited
        (self.run_dir / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
        self.endpoints = Endpoints.resolve(config.transport, self.run_dir)
        self.log_dir = config.output_dir / "logs" / config.scan_id
        self.log_dir.mkdir(parents=True, exist_ok=True)

        self.context = zmq.Context()
        self.work = self.context.socket(zmq.PUSH)
        self.work.setsockopt(zmq.SNDHWM, config.transport.high_water_mark)
        self.work.bind(self.endpoints.work)
        self.acks = self.context.socket(zmq.PULL)
        self.acks.bind(self.endpoints.acks)
        self.control = self.context.socket(zmq.PUB)
        self.control.bind(self.endpoints.control)
        self.failed_out = self.context.socket(zmq.PUSH)  # failure records straight to the writer
        self.failed_out.setsockopt(zmq.LINGER, 5000)
        self.failed_out.connect(self.endpoints.results)
        self._send_poller = zmq.Poller()  # room on the work socket, or acks waiting
        self._send_poller.register(self.work, zmq.POLLOUT)
        self._send_poller.register(self.acks, zmq.POLLIN)

        self._spawn("writer", "workers.writer", 0)
        for number in range(config.n_workers):
            self._spawn(f"worker-{number}", "workers.inference", number)
        self._wait_ready()
        self._started = time.perf_counter()
        return self

    def _spawn(self, name: str, module: str, number: int) -> None:
        log = self.log_dir / f"{name}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", module, "--run-dir", str(self.run_dir), "--id", str(number)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._children.append(_Child(name, process, log))

    def _check_children(self) -> None:
        for child in self._children:
            code = child.process.poll()
            if code is not None:
                raise ScanError(
                    f"{child.name} exited with code {code} during the scan; "
                    f"last lines of {child.log}:\n{child.tail()}"
                )

    def _wait_ready(self) -> None:
        expected = {f"worker-{n}" for n in range(self.config.n_workers)} | {"writer-0"}
        ready: set[str] = set()
        deadline = time.monotonic() + self.config.transport.startup_timeout_s
        while ready != expected:
            if time.monotonic() > deadline:
                raise ScanError(
                    f"not ready after {self.config.transport.startup_timeout_s} s: "
                    f"{sorted(expected - ready)}"
                )
            if self.acks.poll(200):
                message = decode(self.acks.recv_multipart())
                if message.kind == "ready":
                    ready.add(f"{message.header['role']}-{message.header['id']}")
            self._check_children()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Broadcast stop until every child has exited (then terminate stragglers)."""
        deadline = time.monotonic() + timeout_s
        while any(c.process.poll() is None for c in self._children) and time.monotonic() < deadline:
            self.control.send_multipart(encode("stop"))
            time.sleep(0.1)
        for child in self._children:
            if child.process.poll() is None:
                child.process.kill()
            child.process.wait()
        for socket in (self.work, self.acks, self.control, self.failed_out):
            socket.close(linger=0)
        self.context.term()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> ScanRunner:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- feeding and acknowledgements -----------------------------------------------------
    def submit(self, exposure: Exposure) -> None:
        """Integrate one exposure and send it on (blocks while the workers are saturated)."""
        if exposure.index in self._sent_at:
            raise ValueError(f"exposure {exposure.index} was already submitted")
        self._sent_at[exposure.index] = time.perf_counter()
        header = {
            "index": exposure.index,
            "scan_id": exposure.scan_id,
            "timestamp": exposure.timestamp,
            "truth": exposure.truth,
            "source": exposure.metadata.get("source", ""),
        }
        if exposure.error is not None or exposure.frame is None:
            error = exposure.error or "the source delivered no frame"
            self.failed_out.send_multipart(
                encode("failed", {**header, "stage": "read", "error": error})
            )
            return
        try:
            normalization = exposure_normalization(exposure, self.config.integration)
            line_out = self.integrator.integrate(exposure.frame, normalization)
        except FrameError as error:
            self.failed_out.send_multipart(
                encode("failed", {**header, "stage": "integration", "error": str(error)})
            )
            return
        frames = encode(
            "line_out",
            {**header, "normalization": line_out.normalization},
            counts=line_out.counts.astype(np.float32),
            counts_sd=line_out.counts_sd.astype(np.float32),
        )
        while True:  # keep draining acks while waiting for room, so nothing can deadlock
            events = dict(self._send_poller.poll(1000))
            if self.acks in events:
                self.collect()
            if self.work in events:
                self.work.send_multipart(frames, copy=False)
                return
            self._check_children()

    def collect(self, timeout_ms: int = 0) -> int:
        """Take every acknowledgement waiting (after up to ``timeout_ms``); return how many."""
        taken = 0
        while self.acks.poll(timeout_ms if taken == 0 else 0):
            message = decode(self.acks.recv_multipart())
            if message.kind != "ack":
                continue
            index = int(message.header["index"])
            if message.header.get("duplicate") or index in self._status:
                self.duplicates += 1
                continue
            self._status[index] = message.header["status"]
            if self._status[index] != "ok":
                self.failures[index] = str(message.header.get("error", ""))
            self._latency_s[index] = time.perf_counter() - self._sent_at.get(index, np.nan)
            taken += 1
        return taken

    @property
    def pids(self) -> list[int]:
        """Process ids of the writer and the inference workers."""
        return [child.process.pid for child in self._children]

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
            self._check_children()
        return self.summary()

    def summary(self) -> ScanSummary:
        wall = time.perf_counter() - self._started
        latencies = np.array(list(self._latency_s.values())) * 1e3
        return ScanSummary(
            scan_id=self.config.scan_id,
            output_path=str(self.config.output_path),
            submitted=self.n_submitted,
            written_ok=self.n_done - len(self.failures),
            failed=len(self.failures),
            duplicates=self.duplicates,
            wall_s=wall,
            exposures_per_s=self.n_done / wall if wall > 0 else 0.0,
            latency_p50_ms=float(np.percentile(latencies, 50)) if latencies.size else np.nan,
            latency_p99_ms=float(np.percentile(latencies, 99)) if latencies.size else np.nan,
            failures=dict(self.failures),
        )
