"""Integration in processes of their own, for detectors faster than one pyFAI engine.

pyFAI's ``integrate1d`` does not get faster with a second OpenMP thread on an Eiger 4M
sector: most of its 12-23 ms per frame is spent preparing the 4.5 million pixels (12.2 ms on
one thread, 13.9 ms on two, on this project's build machine). :class:`IntegratorPool` runs
``processes`` engines instead, each a spawned process with its own
:class:`~pipeline.integration.LineOutIntegrator` (one OpenMP thread unless the configuration
says otherwise). It pays where a frame's integration costs more than its copy (1.3-2.5 ms
for 18 MB): the ``lut`` and ``histogram`` methods, a full ring; the ``csr`` method's own
engine sums only the pixels of the region (:mod:`pipeline.integration.csr`, 0.2-0.3 ms per
Eiger 4M sector frame), faster in the feeder than any copy.

Frames reach them through shared memory: each process has ``slots`` slot files (``/dev/shm``
where it exists); :meth:`IntegratorPool.submit` copies a frame into a free slot of the least
busy process (the frame's one copy) and sends the slot's place with the exposure's key through
a pipe. A frame that lies in a slot file already (read ahead by
:class:`~pipeline.sources.ReadAhead`: :func:`~pipeline.scratch.slot_file_of`) is not copied:
the process reads it in the reader's slot, which the pool keeps leased until the frame is
integrated; the line-out (or the :class:`~pipeline.integration.FrameError` text of a frame that
cannot be integrated) comes back as an :class:`Integrated`. Each key is integrated exactly
once, in any order across processes.

A frame may also come still compressed, as a DECTRIS stream sends it
(:class:`~pipeline.sources.compression.EncodedFrame`): then only its compressed bytes are
copied, and the process decodes it before integrating it. Decoding is where the time goes
(9-23 ms for an Eiger 4M bitshuffle-LZ4 frame, against 0.2-0.3 ms for the ``csr`` engine's
sector), so this is how the processes share a fast detector's work; data that does not
decode comes back as a failure of the ``read`` stage.

A process that dies (killed, out of memory) loses nothing: its frames are still in its slots
(or leased in the reader's),
so a new process takes its place and integrates them again, in the order sent. The frame it
was integrating when it died counts a try; an exposure whose process died
:data:`MAX_TRIES` times under it comes back as failed instead of killing another (a frame that
crashes pyFAI does not stop the scan). An error in a process that is not about its frame
(a geometry that cannot be built, a bug) ends the pool: :class:`IntegratorError` with the
process's traceback; so does a process that dies before its engine is built, unless one
before it in its place built one and it had frames to take over (a kill, not a broken
environment: each such death counts a try too).

The pool waits for nothing by itself: :meth:`IntegratorPool.collect` takes what has arrived,
and :meth:`IntegratorPool.fds` are the pipes to wait on (a caller's ``select``/``zmq`` poll);
a dead process makes its pipe readable too.

Example:
    >>> import numpy as np
    >>> from pipeline.config import IntegrationConfig
    >>> from pipeline.physics import QGrid
    >>> with IntegratorPool(IntegrationConfig(), QGrid(), processes=2) as pool:
    ...     frame = np.ones((2167, 2070), np.uint32)  # the default PONI's Eiger 4M
    ...     for key in range(3):
    ...         pool.submit(key, frame)
    ...     done = pool.wait_all(timeout_s=60)
    >>> sorted(result.key for result in done), all(r.line_out is not None for r in done)
    ([0, 1, 2], True)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import shutil
import signal
import time
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import numpy as np

from pipeline.config import IntegrationConfig, PipelineConfig
from pipeline.exposure import LineOut
from pipeline.integration import FrameError, LineOutIntegrator
from pipeline.physics import QGrid
from pipeline.scratch import frame_view, make_scratch_dir, shared_memory_folder, slot_file_of
from pipeline.source_specs import DectrisStreamSource, EigerFiles
from pipeline.sources.compression import EncodedFrame, FormatError

#: Times an integrator process may die while integrating one frame before that frame fails.
MAX_TRIES = 2
#: Seconds a process is given to stop by itself before it is terminated.
STOP_TIMEOUT_S = 5.0
#: The slot folders' names: this prefix, the owner's PID, a random part.
SLOT_FOLDER_PREFIX = "beamline-inn-integrate-"
#: The most integrator processes a scan starts by itself (``n_integrators`` empty).
MAX_AUTO_INTEGRATORS = 8
#: Frames each integrator process holds by default, the one it integrates included.
SLOTS_PER_PROCESS = 2
#: Slot files an integrator process keeps mapped, the most recently used (its own, and those of
#: a read-ahead ring it reads frames in); others are mapped again when met.
MAX_MAPPED_SLOTS = 64


def integrator_processes(config: PipelineConfig) -> int:
    """pyFAI engines for the scan: 1 where the inference workers integrate
    (``integrate_on_workers``), else ``n_integrators``; else 1 for the ``csr`` method on
    decoded frames (it sums only the pixels its matrix names: 0.2-0.3 ms per Eiger 4M sector frame
    in the feeder, less than copying the frame to another process), and for the others, and
    for frames that come compressed (a DECTRIS stream, Eiger HDF5 files: the integrator
    processes decode them), the cores this process may use beside its local CPU inference
    workers (all of them with GPU workers), at least 1 and at most
    :data:`MAX_AUTO_INTEGRATORS`."""
    if config.integrate_on_workers:  # the inference workers integrate
        return 1
    if config.n_integrators is not None:
        return config.n_integrators
    compressed = isinstance(config.source, DectrisStreamSource | EigerFiles)
    if config.integration.method == "csr" and not compressed:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    on_gpu = config.inference.device.startswith("cuda")
    return max(1, min(MAX_AUTO_INTEGRATORS, (cores or 1) - (0 if on_gpu else config.n_workers)))


def frames_held(config: PipelineConfig) -> int:
    """Frames the scan's integrator processes may hold at once (:data:`SLOTS_PER_PROCESS`
    each), and the one being handed to them; 0 where the feeder integrates each frame as it
    comes. A reader of frames into shared memory needs this many slots more than it reads
    ahead, for the processes to take every frame where it lies.

    Example:
        >>> from pipeline.config import PipelineConfig
        >>> frames_held(PipelineConfig(scan_id="doc", n_integrators=3))
        7
    """
    processes = integrator_processes(config)
    return processes * SLOTS_PER_PROCESS + 1 if processes > 1 else 0


def decoded_by_receiver(config: PipelineConfig) -> bool:
    """Whether the process that receives the scan's frames decodes them: not where
    integrator processes (:func:`integrator_processes`) or the inference workers
    (``integrate_on_workers``) integrate them, which then get compressed frames as they came
    and decode them themselves.

    Example:
        >>> from pipeline.config import PipelineConfig
        >>> decoded_by_receiver(PipelineConfig(scan_id="doc", integrate_on_workers=True))
        False
    """
    return integrator_processes(config) < 2 and not config.integrate_on_workers


class IntegratorError(RuntimeError):
    """An integrator process could not start, or failed on something other than its frame;
    the message carries its traceback."""


@dataclass(frozen=True)
class FrameSlot:
    """Where a frame waits for its integrator: the slot file ``path``, as ``shape`` ``dtype``."""

    path: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class _Job:
    """A frame to integrate: the caller's ``key``, its slot, the exposure's normalization and
    its source (named where the frame's shape is refused); ``encoded`` where the slot holds
    the frame's compressed bytes (its description, without them)."""

    key: int
    slot: FrameSlot
    normalization: float
    source: str | None
    encoded: EncodedFrame | None = None


@dataclass(frozen=True)
class Integrated:
    """A frame integrated by the pool: its ``line_out``, or the ``error`` that says why there
    is none (a :class:`~pipeline.integration.FrameError`, compressed data that does not
    decode, or a process that died under it :data:`MAX_TRIES` times) and at which ``stage``
    (``read``: decoding; ``integration``); ``seconds`` spent decoding and integrating it."""

    key: int
    line_out: LineOut | None
    error: str | None
    seconds: float
    stage: str = "integration"


@dataclass(frozen=True)
class _Ready:
    """An integrator process has built its engine."""

    pid: int


@dataclass(frozen=True)
class _Failed:
    """An integrator process failed on something other than a frame: its traceback."""

    traceback: str


def _integrate_from_slots(config: IntegrationConfig, grid: QGrid, pipe: Connection) -> None:
    """An integrator process: build the engine, then integrate each job's frame until the pipe
    closes or says ``None``. It leaves the terminal's process group: a Ctrl-C or a signal
    to the group reaches the owner, which stops it (a dead owner closes the pipe)."""
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        integrator = LineOutIntegrator(config, grid)
        pipe.send(_Ready(os.getpid()))
        maps: OrderedDict[str, np.memmap] = OrderedDict()  # the least recently used first
        while (job := pipe.recv()) is not None:
            if job.slot.path in maps:
                maps.move_to_end(job.slot.path)
            else:
                if len(maps) >= MAX_MAPPED_SLOTS:  # (a deep read-ahead ring, or old slots)
                    maps.popitem(last=False)
                maps[job.slot.path] = np.memmap(job.slot.path, dtype=np.uint8, mode="r")
            frame = frame_view(maps[job.slot.path], job.slot.shape, job.slot.dtype)
            start = time.perf_counter()
            try:
                if job.encoded is not None:
                    frame = job.encoded.with_data(frame.data).decode(job.source)
            except FormatError as error:
                seconds = time.perf_counter() - start
                pipe.send(Integrated(job.key, None, str(error), seconds, "read"))
                continue
            try:
                line_out = integrator.integrate(frame, job.normalization, source=job.source)
            except FrameError as error:
                pipe.send(Integrated(job.key, None, str(error), time.perf_counter() - start))
                continue
            pipe.send(Integrated(job.key, line_out, None, time.perf_counter() - start))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the owner has gone, or stops the scan
    except BaseException:
        pipe.send(_Failed(traceback.format_exc()))


@dataclass
class _Seat:
    """One integrator's place: its slot files (which outlive a process that dies), the process
    now in it, and the jobs sent to it, oldest first."""

    number: int
    folder: str
    n_slots: int
    process: multiprocessing.process.BaseProcess | None = None
    pipe: Connection | None = None
    ready: bool = False
    #: whether a process of this seat has built its engine (the environment can)
    ever_ready: bool = False
    buffers: dict[int, tuple[str, np.memmap]] = field(default_factory=dict)
    jobs: dict[int, tuple[_Job, int]] = field(default_factory=dict)  # key -> job, slot number
    #: frames integrated where they lie (another's slot file), kept until integrated
    leased: dict[int, np.ndarray] = field(default_factory=dict)

    def done(self, key: int) -> None:
        """Forget the job ``key`` (integrated, or failed), and its frame's lease."""
        del self.jobs[key]
        self.leased.pop(key, None)

    @property
    def has_free_slot(self) -> bool:
        """Whether a process sits here and holds fewer frames than it has slots."""
        return self.pipe is not None and len(self.jobs) < self.n_slots

    def free_slot(self) -> int:
        """The lowest slot number no job holds (the seat :attr:`has_free_slot`)."""
        used = {slot for _, slot in self.jobs.values()}
        return next(n for n in range(self.n_slots) if n not in used)

    def slot_for(self, number: int, frame: np.ndarray) -> FrameSlot:
        """Slot ``number`` holding a copy of ``frame`` (a larger file where it does not fit,
        with a quarter more room: compressed frames vary in size)."""
        if number not in self.buffers or self.buffers[number][1].size < frame.nbytes:
            size = max(frame.nbytes + frame.nbytes // 4, 1)
            path = os.path.join(self.folder, f"seat-{self.number}-slot-{number}-{size}.bin")
            with open(path, "wb") as file:  # OSError where /dev/shm has no room for it
                os.posix_fallocate(file.fileno(), 0, size)
            if number in self.buffers:
                os.remove(self.buffers[number][0])
            self.buffers[number] = (path, np.memmap(path, dtype=np.uint8, mode="r+"))
        path, buffer = self.buffers[number]
        frame_view(buffer, frame.shape, frame.dtype)[...] = frame
        return FrameSlot(path, tuple(frame.shape), frame.dtype.str)


class IntegratorPool:
    """``processes`` integrator processes fed through ``slots`` shared-memory slots each (a
    context manager; see the module doc). The processes are spawned: a script that uses this
    at its top level needs the ``if __name__ == "__main__":`` guard.

    Args:
        config: the scan's integration settings (``openmp_threads`` 1 where not set).
        grid: the model's q grid.
        processes: integrator processes (at least 1).
        slots: frames each process may hold, the one it integrates included (at least 1;
            2 keeps it busy while the next frame is copied in).

    Attributes:
        restarts: processes started again after one died.
        copied_bytes: bytes copied into the slots so far (a frame that lies in a slot file
            already is not copied).
    """

    def __init__(
        self,
        config: IntegrationConfig,
        grid: QGrid,
        processes: int,
        slots: int = SLOTS_PER_PROCESS,
    ) -> None:
        if processes < 1 or slots < 1:
            raise ValueError(f"processes and slots must be at least 1, got {processes}, {slots}")
        if config.openmp_threads is None:
            config = config.model_copy(update={"openmp_threads": 1})
        self.config = config
        self.grid = grid
        self.restarts = 0
        self.copied_bytes = 0
        self._context = multiprocessing.get_context("spawn")  # no fork: callers run threads
        self._folder = str(make_scratch_dir(SLOT_FOLDER_PREFIX, shared_memory_folder()))
        weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)  # also at exit
        self._seats = [_Seat(number, self._folder, slots) for number in range(processes)]
        self._tries: dict[int, int] = {}
        self._arrived: list[Integrated] = []  # collected, not yet returned
        #: the pipes of the processes running now, by file descriptor (one poll for all)
        self._poll = select.poll()
        self._seat_of: dict[int, _Seat] = {}
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> IntegratorPool:
        """Spawn the processes (they build their engines meanwhile: :meth:`wait_ready`)."""
        for seat in self._seats:
            if seat.process is None:
                self._spawn(seat)
        return self

    def _spawn(self, seat: _Seat) -> None:
        mine, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_integrate_from_slots,
            args=(self.config, self.grid, theirs),
            name=f"beamline-inn-integrator-{seat.number}",
            daemon=True,
        )
        process.start()
        theirs.close()  # the process's end: closed here, so that its death reads as EOF
        seat.process, seat.pipe, seat.ready = process, mine, False
        self._poll.register(mine.fileno(), select.POLLIN)
        self._seat_of[mine.fileno()] = seat

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until every process has built its engine; :class:`IntegratorError` if one
        failed, or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.ready:
            if time.monotonic() > deadline:
                starting = [seat.number for seat in self._seats if not seat.ready]
                raise IntegratorError(
                    f"integrator processes {starting} not ready after {timeout_s:g} s"
                )
            self.wait_any(0.1)

    @property
    def ready(self) -> bool:
        """Whether every process has built its engine."""
        return all(seat.ready for seat in self._seats)

    def close(self) -> None:
        """Stop the processes (each ends the frame it integrates; terminated after
        :data:`STOP_TIMEOUT_S`) and remove the slots; frames not integrated yet are dropped
        (:attr:`pending` is 0)."""
        if self._closed:
            return
        self._closed = True
        for seat in self._seats:
            if seat.pipe is not None:
                with contextlib.suppress(OSError):  # one that died: joined below
                    seat.pipe.send(None)
        for seat in self._seats:
            self._end(seat)
            seat.buffers.clear()
            seat.jobs.clear()
            seat.leased.clear()
        shutil.rmtree(self._folder, ignore_errors=True)

    def _end(self, seat: _Seat) -> None:
        if seat.process is not None:
            seat.process.join(STOP_TIMEOUT_S)
            if seat.process.is_alive():
                seat.process.terminate()
                seat.process.join()
        if seat.pipe is not None:
            self._poll.unregister(seat.pipe.fileno())
            del self._seat_of[seat.pipe.fileno()]
            seat.pipe.close()
        seat.process, seat.pipe, seat.ready = None, None, False

    def __enter__(self) -> IntegratorPool:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- work --------------------------------------------------------------------------------
    @property
    def pids(self) -> list[int]:
        """Process ids of the integrator processes running now, by place."""
        return [seat.process.pid for seat in self._seats if seat.process and seat.process.pid]

    @property
    def has_room(self) -> bool:
        """Whether a process has a free slot for another frame."""
        return not self._closed and any(seat.has_free_slot for seat in self._seats)

    @property
    def pending(self) -> int:
        """Frames sent and not yet integrated."""
        return sum(len(seat.jobs) for seat in self._seats)

    def submit(
        self,
        key: int,
        frame: np.ndarray | EncodedFrame,
        normalization: float = 1.0,
        source: str | None = None,
    ) -> None:
        """Copy ``frame`` (an array, or its compressed bytes for an
        :class:`~pipeline.sources.compression.EncodedFrame`) into a free slot of the least
        busy process and have it integrated under ``key`` (``ValueError`` for a key pending
        already; ``RuntimeError`` when no slot is free: wait for :attr:`has_room`). A frame
        that lies in a slot file already (:func:`~pipeline.scratch.slot_file_of`) is read
        there instead, and kept (its lease) until it is integrated."""
        if any(key in seat.jobs for seat in self._seats):
            raise ValueError(f"frame {key} is being integrated already")
        if not self.has_room:
            raise RuntimeError("no integrator has a free slot: wait for has_room")
        # the least busy, one with its engine built first
        free = [seat for seat in self._seats if seat.has_free_slot]
        seat = min(free, key=lambda seat: (len(seat.jobs), not seat.ready))
        number = seat.free_slot()
        if isinstance(frame, EncodedFrame):
            data = np.frombuffer(memoryview(frame.data).cast("B"), np.uint8)
            slot = seat.slot_for(number, data)
            self.copied_bytes += data.nbytes
            job = _Job(key, slot, float(normalization), source, frame.without_data())
        elif (lying := slot_file_of(frame)) is not None:
            slot = FrameSlot(lying, tuple(frame.shape), frame.dtype.str)
            job = _Job(key, slot, float(normalization), source)
            seat.leased[key] = frame
        else:
            job = _Job(key, seat.slot_for(number, frame), float(normalization), source)
            self.copied_bytes += frame.nbytes
        seat.jobs[key] = (job, number)
        self._send(seat, job)

    def _send(self, seat: _Seat, job: _Job) -> None:
        assert seat.pipe is not None  # (started)
        with contextlib.suppress(OSError):  # one that died: collect() starts another with it
            seat.pipe.send(job)

    def fds(self) -> list[int]:
        """File descriptors of the processes' pipes: readable when a result has arrived or a
        process has died (for a caller's poll before :meth:`collect`)."""
        return [seat.pipe.fileno() for seat in self._seats if seat.pipe is not None]

    def collect(self) -> list[Integrated]:
        """What has been integrated since the last call (without waiting); a process that
        died is replaced, and its frames sent to the new one."""
        return self._collect(0.0)

    def _collect(self, timeout_s: float) -> list[Integrated]:
        """:meth:`collect`, after waiting up to ``timeout_s`` for a pipe to become readable;
        one ``poll`` of all pipes, then again until none is (a process's messages arrive one
        at a time)."""
        timeout_ms: float = max(0.0, timeout_s) * 1000
        while events := self._poll.poll(timeout_ms):
            timeout_ms = 0
            for fd, _ in events:  # an IntegratorError keeps what arrived for the next call
                if (seat := self._seat_of.get(fd)) is not None:  # (not replaced meanwhile)
                    self._arrived.extend(self._receive(seat))
        done, self._arrived = self._arrived, []
        return done

    def _receive(self, seat: _Seat) -> Iterator[Integrated]:
        """The message a seat's readable pipe holds: an integrated frame, the process's
        readiness or failure; its death (the pipe at its end) replaces it."""
        assert seat.pipe is not None  # (a pipe that polled readable)
        try:
            message = seat.pipe.recv()
        except (EOFError, OSError):
            yield from self._replace(seat)
            return
        if isinstance(message, _Ready):
            seat.ready = seat.ever_ready = True
        elif isinstance(message, _Failed):
            raise IntegratorError(f"integrator process {seat.number} failed:\n{message.traceback}")
        else:
            seat.done(message.key)
            self._tries.pop(message.key, None)
            yield message

    def _replace(self, seat: _Seat) -> Iterator[Integrated]:
        """Start a process in place of the seat's dead one and send it the seat's frames; the
        frame the dead one was integrating counts a try (and fails at :data:`MAX_TRIES`)."""
        assert seat.process is not None
        seat.process.join(STOP_TIMEOUT_S)
        code = seat.process.exitcode
        was_ready = seat.ready
        self._end(seat)
        if not seat.ever_ready or not (was_ready or seat.jobs):
            raise IntegratorError(
                f"integrator process {seat.number} exited with code {code} before its engine "
                "was built"
            )
        if seat.jobs:
            key = next(iter(seat.jobs))
            self._tries[key] = self._tries.get(key, 0) + 1
            if self._tries[key] >= MAX_TRIES:
                seat.done(key)
                del self._tries[key]
                yield Integrated(
                    key,
                    None,
                    f"the integrator process died under this frame {MAX_TRIES} times (last "
                    f"exit code {code})",
                    0.0,
                )
        self.restarts += 1
        self._spawn(seat)
        for job, _ in seat.jobs.values():
            self._send(seat, job)

    def wait_any(self, timeout_s: float) -> list[Integrated]:
        """Wait up to ``timeout_s`` for a process to send something, then :meth:`collect`."""
        return self._collect(timeout_s)

    def wait_all(self, timeout_s: float) -> list[Integrated]:
        """Wait until every frame sent is integrated (:class:`IntegratorError` after
        ``timeout_s``); return what was integrated meanwhile."""
        deadline = time.monotonic() + timeout_s
        done = self.collect()
        while self.pending:
            if time.monotonic() > deadline:
                raise IntegratorError(f"{self.pending} frames not integrated after {timeout_s:g} s")
            done.extend(self.wait_any(0.1))
        return done
