"""Reading frames in a process of its own, ahead of the integrator.

Decoding a frame costs about as much as integrating it (a Pilatus 1M CBF 4-6 ms against 7 ms
of integration, an Eiger 4M bitshuffle-LZ4 frame 17-23 ms against 27 ms, on this project's
build machine), and neither fabio's decoders nor, fully, h5py's release Python's lock, so a
thread does not hide it. :class:`ReadAhead` runs any picklable source (a
:class:`~pipeline.sources.FileSource`, an :class:`~pipeline.sources.EigerSource`) in a spawned
reader process that decodes up to ``depth`` frames ahead of the consumer.

Frames travel through a ring of ``depth`` slot files in shared memory (``/dev/shm`` where it
exists): the reader writes a frame into a free slot and sends its place in the ring with the
rest of the exposure through a pipe. The consumer gets a read-only view of the slot, and the
slot goes back to the reader once the consumer has dropped every reference to that frame
(a consumer that keeps frames gets copies once it holds ``depth - 1`` of them, so the reader
never waits on frames kept for good). A frame's slot file is named by
:func:`~pipeline.scratch.slot_file_of`: the integrator processes read it there, without a
copy. Exposures come out in the source's order, each exactly
once, frames that could not be read included (``error`` set). If the reader fails, the
consumer gets a :class:`ReaderError` with the reader's traceback after the exposures read
before the failure; stopping early (:meth:`ReadAhead.stop`, or closing the iterator) stops the
reader. :attr:`ReadAhead.ended_cleanly` is the source's own, as the reader found it at the
end; :attr:`ReadAhead.statistics` counts the exposures delivered. The slot files are removed
on any exit, once the consumer has dropped the frames that look into them (at the latest
when the consumer's process exits), and those
left by a kill (SIGKILL) at the next start: their folder names the consumer's PID
(:mod:`pipeline.scratch`).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from fabio.edfimage import EdfImage
    >>> from pipeline.sources import FileSource
    >>> folder = Path(tempfile.mkdtemp())
    >>> for n in range(3):
    ...     EdfImage(data=np.full((4, 5), n, np.uint16)).write(str(folder / f"f_{n}.edf"))
    >>> source = ReadAhead(FileSource([folder / "f_*.edf"], scan_id="scan-1"), depth=2)
    >>> [(e.index, int(e.frame[0, 0])) for e in source.exposures()]
    [(0, 0), (1, 1), (2, 2)]
    >>> source.ended_cleanly, source.statistics.summary()
    (True, '3 frames (3 read, 0 failed)')
    >>> import shutil; shutil.rmtree(folder)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing
import os
import shutil
import threading
import traceback
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event

import numpy as np

from pipeline.exposure import Exposure
from pipeline.scratch import SlotLease, frame_view, make_scratch_dir, shared_memory_folder
from pipeline.sources.base import FrameCounts, Source

#: Seconds between the reader's checks for a stop while it waits for a free slot.
POLL_S = 0.5
#: Seconds the reader is given to stop by itself before it is terminated.
STOP_TIMEOUT_S = 10.0
#: The slot folders' names: this prefix, the consumer's PID, a random part.
SLOT_FOLDER_PREFIX = "beamline-inn-frames-"


class ReaderError(RuntimeError):
    """The reader process failed; the message carries its traceback."""


@dataclass(frozen=True)
class _Slot:
    """Where a frame waits: slot ``number`` of the ring, in ``path``, as ``shape`` ``dtype``."""

    number: int
    path: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class _End:
    """The reader's last word when its source has given everything: how it ended."""

    ended_cleanly: bool


def _read_into_slots(
    source: Source, folder: str, free: Connection, ready: Connection, stop: Event
) -> None:
    """The reader process: every exposure of ``source`` to ``ready``, frames into slots.

    Sends an :class:`_End` at the end, or the traceback text when the source fails; returns
    quietly when the consumer has gone (``stop`` set, or its end of a pipe closed).
    """
    slots: dict[int, tuple[str, np.memmap]] = {}  # slot number -> its file, mapped as bytes
    try:
        for exposure in source.exposures():
            frame, slot = exposure.frame, None
            if frame is not None:
                number = _take_free_slot(free, stop)
                if number is None:
                    return
                if number not in slots or slots[number][1].size < frame.nbytes:
                    # a new file for a larger frame (the consumer maps it when it first sees it)
                    path = os.path.join(folder, f"slot-{number}-{frame.nbytes}.bin")
                    with open(path, "wb") as file:  # OSError where /dev/shm has no room
                        os.posix_fallocate(file.fileno(), 0, max(frame.nbytes, 1))
                    if number in slots:  # (its frame was dropped: the slot came back free)
                        os.remove(slots[number][0])
                    slots[number] = (path, np.memmap(path, dtype=np.uint8, mode="r+"))
                path, buffer = slots[number]
                frame_view(buffer, frame.shape, frame.dtype)[...] = frame
                slot = _Slot(number, path, frame.shape, frame.dtype.str)
            ready.send((dataclasses.replace(exposure, frame=None), slot))
            if stop.is_set():
                return
        ready.send(_End(source.ended_cleanly))
    except (BrokenPipeError, EOFError):
        return  # the consumer has gone
    except BaseException:  # everything else goes to the consumer, who raises it
        ready.send(traceback.format_exc())


def _take_free_slot(free: Connection, stop: Event) -> int | None:
    """The next free slot's number, or ``None`` once ``stop`` is set."""
    while not stop.is_set():
        if free.poll(POLL_S):
            return free.recv()
    return None


class _Leases:
    """The consumer's leases on the ring's slots: counts them, queues the slots of frames
    dropped (from a lease's finalizer, in any thread), and removes the slot folder once the
    ring is closed and no frame looks into it any more (another process may still be
    about to read a frame there: the integrator processes)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.released: deque[int] = deque()  # slots whose frames the consumer has dropped
        self._held = 0
        self._closed = False
        self._lock = threading.RLock()  # (a finalizer may run in the middle, in this thread)

    @property
    def held(self) -> int:
        """Frames the consumer still holds (their slots not yet handed back)."""
        return self._held - len(self.released)

    def lease(self, view: np.ndarray, slot: _Slot) -> np.ndarray:
        """The frame ``view`` of ``slot``, holding it until the consumer drops it."""
        with self._lock:
            self._held += 1
        return np.asarray(SlotLease(view, slot.path, functools.partial(self._release, slot.number)))

    def take_released(self) -> int | None:
        """A slot whose frame the consumer has dropped, or ``None``."""
        with self._lock:
            if not self.released:
                return None
            self._held -= 1
            return self.released.popleft()

    def _release(self, number: int) -> None:
        self.released.append(number)
        with self._lock:
            remove = self._closed and self._held == len(self.released)
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)

    def close(self) -> None:
        """Remove the slot folder now, or when the last frame looking into it is dropped."""
        with self._lock:
            self._closed = True
            remove = self._held == len(self.released)
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class _Reader:
    """A started reader process, the consumer's leases on its slots, and the consumer's ends
    of its pipes."""

    process: multiprocessing.process.BaseProcess
    leases: _Leases
    free: Connection
    ready: Connection
    stop: Event

    def close(self) -> None:
        """Stop the reader (terminated after :data:`STOP_TIMEOUT_S`) and remove the slots
        (once the consumer has dropped their frames)."""
        self.stop.set()
        self.free.close()
        self.ready.close()
        self.process.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.leases.close()


class ReadAhead:
    """Exposures of ``source``, read by a separate process up to ``depth`` frames ahead.

    The reader starts with the first exposure asked for, or earlier with :meth:`start` (its
    start-up, about a second, then overlaps whatever else is starting); :meth:`close`, or
    leaving a ``with`` block, stops it. The source is read once. The reader is a spawned
    process: a script that uses this at its top level needs the
    ``if __name__ == "__main__":`` guard, as for any :mod:`multiprocessing` spawn.

    Args:
        source: a picklable source (its ``exposures()`` runs in the reader process).
        depth: frames decoded ahead of the consumer (the number of slots in the ring).

    Attributes:
        statistics: the exposures delivered so far, and how many failed.
        ended_cleanly: whether the source ended cleanly in the reader (its
            :attr:`~pipeline.sources.base.Source.ended_cleanly`) and every exposure was
            delivered, not stopped; ``False`` until then.
    """

    def __init__(self, source: Source, depth: int = 4) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.source = source
        self.depth = depth
        self.statistics = FrameCounts()
        self.ended_cleanly = False
        self._reader: _Reader | None = None
        self._read = False
        self._stop_requested = threading.Event()

    def start(self) -> None:
        """Start the reader process now (it starts on the first exposure otherwise)."""
        if self._reader is not None:
            return
        context = multiprocessing.get_context("spawn")  # no fork: the caller may run threads
        folder = str(make_scratch_dir(SLOT_FOLDER_PREFIX, shared_memory_folder()))
        # pipes, not queues: a queue's feeder thread waits for Python's lock, which a decoder
        # holds for milliseconds (measured: 10.6 instead of 4.8 ms per CBF frame)
        free_out, free_in = context.Pipe(duplex=False)
        ready_out, ready_in = context.Pipe(duplex=False)
        stop = context.Event()
        process = context.Process(
            target=_read_into_slots,
            args=(self.source, folder, free_out, ready_in, stop),
            name="beamline-inn-reader",
            daemon=True,
        )
        try:
            process.start()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        leases = _Leases(folder)
        # when the last frame is gone, if not closed before (every lease holds ``leases``)
        weakref.finalize(leases, shutil.rmtree, folder, ignore_errors=True)  # also at exit
        free_out.close()  # the reader's ends: closed here, so that its death reads as EOF
        ready_in.close()
        for number in range(self.depth):
            free_in.send(number)
        self._reader = _Reader(process, leases, free_in, ready_out, stop)

    def close(self) -> None:
        """Stop the reader, if it runs, and remove its slot files (once the frames that look
        into them are dropped)."""
        if self._reader is not None:
            self._reader.close()

    def stop(self) -> None:
        """Deliver no exposure after the ones already delivered (from any thread or a signal
        handler): the iteration then ends and stops the reader; frames it read ahead are
        dropped."""
        self._stop_requested.set()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def exposures(self) -> Iterator[Exposure]:
        """The source's exposures, in its order; frames are read-only views of shared memory."""
        if self._read:
            raise RuntimeError("a ReadAhead reads its source once; make a new one")
        self._read = True
        self.start()
        assert self._reader is not None
        reader = self._reader
        maps: dict[str, np.memmap] = {}
        leases = reader.leases
        try:
            while not self._stop_requested.is_set():
                # hand back the slots of frames the consumer has dropped
                while (number := leases.take_released()) is not None:
                    self._hand_back(reader.free, number)
                item = self._next_item(reader.ready, reader.process)
                if isinstance(item, _End):
                    self.ended_cleanly = item.ended_cleanly
                    return
                if self._stop_requested.is_set():
                    return
                exposure, slot = item
                if slot is not None:
                    if slot.path not in maps:
                        maps[slot.path] = np.memmap(slot.path, dtype=np.uint8, mode="r")
                    view = frame_view(maps[slot.path], slot.shape, slot.dtype)
                    if leases.held < self.depth - 1:
                        frame = leases.lease(view, slot)
                    else:  # the consumer keeps its frames: copy, so that the reader goes on
                        frame = view.copy()
                        self._hand_back(reader.free, slot.number)
                    exposure = dataclasses.replace(exposure, frame=frame)
                    del view, frame
                self.statistics.count(exposure.error)
                yield exposure
                del exposure  # the consumer's reference is the one that counts
        finally:
            maps.clear()
            self.close()

    @staticmethod
    def _hand_back(free: Connection, number: int) -> None:
        """Tell the reader that slot ``number`` is free (unless it has finished)."""
        with contextlib.suppress(BrokenPipeError):
            free.send(number)

    @staticmethod
    def _next_item(
        ready: Connection, reader: multiprocessing.process.BaseProcess
    ) -> tuple[Exposure, _Slot | None] | _End:
        """The reader's next exposure, or its :class:`_End`; raises :class:`ReaderError` with
        its traceback when it failed, or when it died without a word."""
        try:
            item = ready.recv()
        except EOFError:
            reader.join(STOP_TIMEOUT_S)
            raise ReaderError(
                f"the reader process stopped (exit code {reader.exitcode}) before the end of "
                "the source"
            ) from None
        if isinstance(item, str):
            raise ReaderError(f"the reader process failed:\n{item}")
        return item
