"""What every source of exposures is: the contract the feeder and the flows rely on.

A :class:`Source` gives its exposures once, in order (:meth:`Source.exposures`); a frame it
cannot read is an exposure with ``error`` set, never an exception, so that the results file
has a row for it. :meth:`Source.stop` may be called from another thread or a signal handler:
the iteration then ends after the frames already taken. Afterwards
:attr:`Source.ended_cleanly` says whether the source gave everything it had (the last file,
the series' end message, every simulated frame), which is when the results file is marked
complete; :attr:`Source.statistics` counts what was read.

:class:`FrameCounts` is the statistics of a source that only counts; the DECTRIS stream's
:class:`~pipeline.sources.dectris.StreamStatistics` says more and follows the same
:class:`SourceStatistics` protocol.

The sources that read files in order share :class:`NumberedFrames`, which implements the
contract over the frames they read (:class:`DetectorFrame`: a frame before it has its place
in a scan): numbering, counting, stopping.

Example:
    >>> counts = FrameCounts()
    >>> counts.count(error=None)
    >>> counts.count(error="truncated file")
    >>> counts.summary()
    '2 frames (1 read, 1 failed)'
"""

from __future__ import annotations

import abc
import contextlib
import os
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from pipeline.exposure import Exposure
from pipeline.sources.compression import EncodedFrame


@runtime_checkable
class SourceStatistics(Protocol):
    """Counts of what a source gave: exposures (read or failed) and failed ones."""

    @property
    def frames_received(self) -> int:
        """Exposures given so far, with a frame or with an error (a stream counts the images
        that came: those that never came, given as failed exposures, it counts apart)."""
        ...

    @property
    def frames_failed(self) -> int:
        """Of these, exposures with an error instead of a frame."""
        ...

    def summary(self) -> str:
        """The counts in one line, for a log or a scan's summary."""
        ...


@runtime_checkable
class Source(Protocol):
    """Where a scan's exposures come from (simulated, files, a watched folder, a stream)."""

    def exposures(self) -> Iterator[Exposure]:
        """The exposures, once each, indices counting up; unreadable frames with ``error``."""
        ...

    def stop(self) -> None:
        """End the iteration after the frames already taken (thread-safe, signal-safe)."""
        ...

    @property
    def ended_cleanly(self) -> bool:
        """Whether the iteration ended because the source gave everything it had (not
        stopped, not cut short by an error); ``False`` until it ended.

        Files: the last frame was read before any :meth:`stop`; a watched folder: watching
        ended on its idle timeout or its number of frames; the DECTRIS stream: the series'
        end message ended it; frames read ahead: the reader's source ended cleanly; simulated
        frames: every one was given. Frames that could not be read do not count against it:
        they are exposures with ``error`` set.
        """
        ...

    @property
    def statistics(self) -> SourceStatistics:
        """What the source has given so far."""
        ...


@dataclass
class FrameCounts:
    """:class:`SourceStatistics` of a source that reads frames: how many, how many failed."""

    frames_received: int = 0
    frames_failed: int = 0

    def count(self, error: str | None) -> None:
        """Count one exposure given, failed when ``error`` is set."""
        self.frames_received += 1
        if error is not None:
            self.frames_failed += 1

    def summary(self) -> str:
        """``N frames (R read, F failed)``."""
        read = self.frames_received - self.frames_failed
        frames = "frame" if self.frames_received == 1 else "frames"
        return f"{self.frames_received} {frames} ({read} read, {self.frames_failed} failed)"


@dataclass
class DetectorFrame:
    """One frame as read from a file, before it takes its place in a scan.

    Attributes:
        data: the 2-D image in the detector's dtype, or ``None`` when it could not be read.
        timestamp: acquisition time, seconds since the epoch (header or file modification time).
        metadata: text values; ``source`` names the file (and frame) it came from.
        error: why the frame could not be read, or ``None``.
        encoded: the frame's compressed bytes, where the reader left them for the integrator
            processes to decode (``data`` is then ``None``).
    """

    data: np.ndarray | None
    timestamp: float
    metadata: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    encoded: EncodedFrame | None = None

    def to_exposure(self, scan_id: str, index: int) -> Exposure:
        """This frame as exposure ``index`` of scan ``scan_id``."""
        return Exposure(
            scan_id=scan_id,
            index=index,
            timestamp=self.timestamp,
            frame=self.data,
            metadata=dict(self.metadata),
            error=self.error,
            encoded=self.encoded,
        )


def failed_frame(source: str, error: str, timestamp: float | None = None) -> DetectorFrame:
    """A frame that could not be read: no data, ``error`` says why, ``source`` where it was
    (``timestamp``: now when not given)."""
    return DetectorFrame(
        data=None,
        timestamp=time.time() if timestamp is None else timestamp,
        metadata={"source": source},
        error=error,
    )


def broken_link_error(path: str | os.PathLike[str]) -> str:
    """The error of a symbolic link whose target does not exist."""
    return f"broken symbolic link: {path} points to {os.readlink(path)}, which does not exist"


class NumberedFrames(abc.ABC):
    """A :class:`Source` of frames read in order (files): numbers them into exposures,
    counts them and stops when asked.

    Subclasses set :attr:`scan_id` and :attr:`first_index` (through ``__init__``) and give
    ``_frames()``. Each call of :meth:`exposures` reads the frames again, numbered from
    ``first_index``; :attr:`statistics` counts over every call, :attr:`ended_cleanly` says
    how the latest one ended. The source stays picklable (a reader process of
    :class:`~pipeline.sources.readahead.ReadAhead` runs it): the stop request is a plain flag,
    whose setting is also safe in a signal handler.

    Attributes:
        statistics: the exposures given, and how many of them failed.
        ended_cleanly: whether the latest iteration read the last frame without a
            :meth:`stop` (``False`` until one did).
    """

    def __init__(self, scan_id: str, first_index: int = 0) -> None:
        self.scan_id = scan_id
        self.first_index = first_index
        self.statistics = FrameCounts()
        self.ended_cleanly = False
        self._stop_requested = False

    @abc.abstractmethod
    def _frames(self) -> Generator[DetectorFrame, None, None]:
        """The frames to number, in reading order."""

    def exposures(self) -> Iterator[Exposure]:
        """One exposure per frame, indices counting up from ``first_index``; no frame is
        read after :meth:`stop`."""
        self.ended_cleanly = False
        index = self.first_index
        with contextlib.closing(self._frames()) as frames:
            while not self._stop_requested:
                frame = next(frames, None)
                if frame is None:
                    self.ended_cleanly = True
                    return
                self.statistics.count(frame.error)
                yield frame.to_exposure(self.scan_id, index)
                index += 1

    def stop(self) -> None:
        """Read no frame after the ones already given (from any thread or a signal
        handler); the iteration then ends, and so does every later one."""
        self._stop_requested = True
