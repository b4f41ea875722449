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

Example:
    >>> counts = FrameCounts()
    >>> counts.count(error=None)
    >>> counts.count(error="truncated file")
    >>> counts.summary()
    '2 frames (1 read, 1 failed)'
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pipeline.exposure import Exposure


@runtime_checkable
class SourceStatistics(Protocol):
    """Counts of what a source gave: exposures (read or failed) and failed ones."""

    @property
    def frames_received(self) -> int:
        """Exposures given so far, with a frame or with an error."""
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
        stopped, not cut short by an error); ``False`` until it ended."""
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
