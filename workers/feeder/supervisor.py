"""The feeder's child processes: the results writer and the local inference workers.

:class:`Supervisor` starts them (``python -m workers.writer`` and ``python -m
workers.inference``, in sessions of their own, their logs in ``OUTPUT_DIR/logs/SCAN_ID/``),
notes which said they are ready, finds those that exited or went silent, replaces a lost
worker (at most ``transport.max_worker_restarts`` per scan), starts the writer again on the
file (at most ``transport.max_writer_restarts``), and stops them all at the end. A process
whose loss another would repeat (one that gave up before it was ready, a writer that could
not write) ends the scan with :class:`~workers.feeder.reports.ScanError` and the last lines
of its log.

Example:
    >>> from pipeline.config import PipelineConfig
    >>> config = PipelineConfig(scan_id="doc", output_dir=Path("out"))
    >>> supervisor = Supervisor(config, ResultsLock(config.output_path))
    >>> supervisor.not_ready()  # before anything started: two workers and the writer
    ['worker-0', 'worker-1', 'writer-0']
    >>> supervisor.log_dir
    PosixPath('out/logs/doc')
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.store import read_completion
from pipeline.store.lock import ResultsLock
from workers.feeder.reports import ScanError
from workers.process import write_dropped_rows
from workers.writer import WRITE_FAILED

#: Below this much free space on the output file system, a scan error says the disk is full.
LOW_DISK_BYTES = 64 * 2**20


def disk_space_note(folder: Path) -> str:
    """A sentence for an error message when ``folder``'s file system is (nearly) full: then
    the log files, on the same disk, may say nothing.

    >>> disk_space_note(Path("/no/such/folder"))
    ''
    """
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


@dataclass
class Child:
    """A process the feeder started: ``name`` (``writer``, ``worker-N``), its number, the
    process and its log."""

    name: str
    number: int
    process: subprocess.Popen
    log: Path

    def tail(self, n: int = 20) -> str:
        """The last ``n`` lines of its log."""
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])


class Supervisor:
    """Starts, watches, replaces and stops the writer and the local inference workers of a
    scan; ``lock`` is the results file's lock, which each writer inherits."""

    def __init__(self, config: PipelineConfig, lock: ResultsLock) -> None:
        self.config = config
        self.lock = lock
        self.log_dir = config.output_dir / "logs" / config.scan_id
        self.run_dir: Path | None = None
        #: in the order started (a replaced process goes to the end)
        self.children: list[Child] = []
        self.worker_restarts = 0
        self.writer_restarts = 0
        self._ready: set[str] = set()
        self._ready_pids: set[int] = set()

    def start(self, run_dir: Path, resume: bool) -> None:
        """Start the writer (``resume``: on an existing file) and the workers of the run in
        ``run_dir``."""
        self.run_dir = run_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._spawn_writer(resume)
        for number in range(self.config.n_workers):
            self._spawn(f"worker-{number}", "workers.inference", number)

    def _spawn_writer(self, resume: bool) -> None:
        options = ["--resume"] if resume else []
        self._spawn(  # the writer holds the file's lock while it lives
            "writer", "workers.writer", 0, *options, pass_fds=(self.lock.fd,)
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
        self.children.append(Child(name, number, process, log))

    # -- readiness ---------------------------------------------------------------------------
    def mark_ready(self, name: str, pid: int) -> None:
        """A child said it is ready (``name`` as in :attr:`Ready.name
        <pipeline.transport.messages.Ready.name>`)."""
        self._ready.add(name)
        self._ready_pids.add(pid)

    def not_ready(self) -> list[str]:
        """The names of the processes the scan starts with that have not said they are
        ready."""
        expected = {f"worker-{n}" for n in range(self.config.n_workers)} | {"writer-0"}
        return sorted(expected - self._ready)

    def is_child(self, pid: int) -> bool:
        """``pid`` is one of the processes running now for this scan."""
        return pid in {child.process.pid for child in self.children}

    @property
    def writer(self) -> Child:
        """The results writer now."""
        (writer,) = (child for child in self.children if child.name == "writer")
        return writer

    # -- losses --------------------------------------------------------------------------------
    def lost_children(self, silent: set[int]) -> Iterator[tuple[Child, int | None]]:
        """The children that exited (with their exit code) or are among the ``silent`` pids
        (``None``), one at a time; :class:`ScanError` for a process that gave up before it
        was ready, or a writer that could not write (exit code ``WRITE_FAILED``)."""
        for child in list(self.children):
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
                    f"{disk_space_note(self.config.output_dir)}"
                    f"last lines of {child.log}:\n{child.tail()}"
                )
            yield child, code

    def replace_worker(self, child: Child, why: str) -> None:
        """Kill a lost worker and start a new one in its place; :class:`ScanError` when
        ``transport.max_worker_restarts`` were replaced already."""
        if self.worker_restarts >= self.config.transport.max_worker_restarts:
            raise ScanError(
                f"{child.name} {why}, and {self.worker_restarts} workers were replaced already; "
                f"last lines of {child.log}:\n{child.tail()}"
            )
        child.process.kill()
        child.process.wait()
        self.children.remove(child)
        _note(child.log, f"--- {child.name} {why}; replaced by the feeder ---")
        self.worker_restarts += 1
        self._spawn(child.name, "workers.inference", child.number)

    def check_complete(self, n_rows: int) -> None:
        """:class:`ScanError` unless the writer marked the results file complete with
        ``n_rows`` rows."""
        completion = read_completion(self.config.output_path)
        if completion is not None and completion.n_exposures == n_rows:
            return
        raise ScanError(
            f"{self.config.output_path} holds every exposure acknowledged, but was not marked "
            f"complete: the writer exited with code {self.writer.process.returncode}; last "
            f"lines of {self.writer.log}:\n{self.writer.tail()}"
        )

    def restart_writer(
        self, writer: Child, code: int | None, service: Callable[[int], object]
    ) -> None:
        """Start a new writer on the results file in place of one that exited with ``code``
        during the scan (it keeps the file's complete rows: ``ResultsWriter(resume=True)``),
        calling ``service(timeout_ms)`` until it is ready. :class:`ScanError` when the writer
        was started again ``transport.max_writer_restarts`` times already, or the new one
        exits before it is ready (a full disk, a file it cannot read)."""
        why = f"the results writer exited with code {code} during the scan"
        if self.writer_restarts >= self.config.transport.max_writer_restarts:
            raise ScanError(
                f"{why}, and was started again {self.writer_restarts} times already; "
                f"{disk_space_note(self.config.output_dir)}"
                f"last lines of {writer.log}:\n{writer.tail()}"
            )
        self.children.remove(writer)
        _note(writer.log, f"--- {why}; started again by the feeder on the file ---")
        self.writer_restarts += 1
        assert self.run_dir is not None  # (started)
        write_dropped_rows(self.run_dir, [])  # rows to redo were left out by the first writer
        self._ready.discard("writer-0")
        self._spawn_writer(resume=True)
        deadline = time.monotonic() + self.config.transport.startup_timeout_s
        while "writer-0" not in self._ready:
            new = self.writer
            if new.process.poll() is not None or time.monotonic() > deadline:
                state = (
                    f"exited with code {new.process.returncode}"
                    if new.process.poll() is not None
                    else f"was not ready after {self.config.transport.startup_timeout_s} s"
                )
                raise ScanError(
                    f"{why}, and the writer started again {state}; "
                    f"{disk_space_note(self.config.output_dir)}"
                    f"last lines of {new.log}:\n{new.tail()}"
                )
            service(200)

    # -- the end -----------------------------------------------------------------------------
    def kill_workers(self) -> None:
        """Kill the local inference workers at once (Ctrl-C: not finishing their batches)."""
        for child in self.children:
            if child.name.startswith("worker"):
                child.process.kill()

    def stop(self, deadline: float, broadcast_stop: Callable[[], None]) -> None:
        """Call ``broadcast_stop()`` every 0.1 s until every child has exited or
        ``deadline`` (``time.monotonic()``) has passed, then kill those left."""
        while any(c.process.poll() is None for c in self.children) and time.monotonic() < deadline:
            broadcast_stop()
            time.sleep(0.1)
        for child in self.children:
            if child.process.poll() is None:
                child.process.kill()
            child.process.wait()
