"""One DECTRIS stream series assembled from its parsed messages into exposures; no sockets,
no clocks: the receiver (:mod:`pipeline.sources.dectris.receiver`) feeds it what came and when.

**What the scan gets.** Every image of the series becomes one exposure, ``index`` = the image
number (0-based), in arrival order; ``timestamp`` is when the detector says the exposure began:
the v2 ``series_date`` + ``start_time``, or the v1 header's ``data_collection_date`` + the
image's ``start_time`` (which counts from the series start; :func:`v1_acquired_at`), else the
time the image was taken from the socket, which ``received_at`` holds in any case;
``metadata`` holds ``source`` (``"tcp://host:port series 3 image 17"``), the protocol, series
and image numbers, encoding, pixel type and exposure times, as text. An image that cannot be decoded (malformed part,
unknown pixel type or encoding, wrong number of parts, size mismatch, no series header yet)
still becomes an exposure with ``frame=None`` and ``error`` saying why.

Messages that name no image of this series are not exposures (their index would clash with
the real image's): they are counted and described in :attr:`SeriesAssembler.statistics` --
unparseable messages (:meth:`SeriesAssembler.reject`), messages of another series or of the
other protocol, and duplicates of an image number already delivered (the first copy wins).
Out-of-order images are delivered as they come, marked ``metadata["out_of_order"] = "true"``
and counted. The series ends at its end message or at a header of a new series (both
:class:`SeriesEnded`), or when the receiver gives up (:meth:`SeriesAssembler.time_out`,
:meth:`SeriesAssembler.stop`); then :meth:`SeriesAssembler.finish` gives every image number
the series should have had (``nimages`` x ``ntrigger`` of a v1 header, or ``ntrigger`` in the
``inte``/``exte`` trigger modes; ``number_of_images`` of a v2 start message; else up to the
highest received) that never came as a failed exposure, so the results file can account for
all of them, and the statistics say what was missing and why.

Example (a start message announcing 2 images, image 1 without data, the end):

    >>> import cbor2
    >>> from pipeline.sources.dectris.messages import parse_message
    >>> def message(**fields):
    ...     return parse_message([cbor2.dumps(fields)])
    >>> assembler = SeriesAssembler("tcp://detector:31001")
    >>> assembler.feed(message(type="start", series_id=5, number_of_images=2), 1.7e9) is None
    True
    >>> exposure = assembler.feed(message(type="image", series_id=5, image_id=1), 1.7e9)
    >>> exposure.index, exposure.scan_id, exposure.frame
    (1, 'dectris-series-5', None)
    >>> exposure.error
    "stream v2 image 1 of series 5: image message has no 'data' map of channels"
    >>> assembler.feed(message(type="end", series_id=5), 1.7e9)
    SeriesEnded(series_id=5, next_series_id=None)
    >>> [(e.index, e.metadata["missing"]) for e in assembler.finish(now=1.7e9)]
    [(0, 'true')]
    >>> assembler.statistics.summary()
    'series 5: 1 of 2 images received (0 decoded, 1 failed), 1 missing (0)'
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.exposure import Exposure
from pipeline.sources.compression import FormatError
from pipeline.sources.dectris.messages import (
    EndMessage,
    HeaderMessage,
    ImageMessage,
    SeriesHeader,
    StreamMessage,
)

log = logging.getLogger(__name__)

_MAX_ERRORS = 1000


#: A v1 ``start_time`` past this many seconds is since the epoch, not since the series start
#: (ALBA's eiger-simulator sends those): 1e9 s is 2001-09-09, 31 years into a series.
_EPOCH_LIKE_S = 1e9


def v1_acquired_at(start_time_ns: str | None, header: SeriesHeader | None) -> float | None:
    """When a v1 image's exposure began, seconds since the epoch: its ``dconfig-1.0``
    ``start_time`` (ns, as the image's metadata holds it) from the series start, the header's
    ``data_collection_date``; a start time past 2001 (:data:`_EPOCH_LIKE_S`) is taken as
    since the epoch. ``None`` when neither applies (then the time the image was taken from
    the socket stands in).

    >>> header = SeriesHeader(series_id=1, protocol="v1", series_date=1_700_000_000.0)
    >>> v1_acquired_at("2500000000", header)
    1700000002.5
    >>> v1_acquired_at("1700000000500000000", None)
    1700000000.5
    >>> v1_acquired_at("2500000000", None) is None
    True
    """
    try:
        start_s = int(start_time_ns) / 1e9 if start_time_ns is not None else None
    except ValueError:
        return None
    if start_s is None:
        return None
    if start_s > _EPOCH_LIKE_S:
        return start_s
    if header is not None and header.series_date is not None:
        return header.series_date + start_s
    return None


def _ranges(numbers: Sequence[int], limit: int = 20) -> str:
    """Image numbers as ranges, at most ``limit`` of them.

    >>> _ranges([7, 1, 2, 3, 9, 10])
    '1-3, 7, 9-10'
    """
    ordered = sorted(numbers)
    spans: list[str] = []
    first = 0
    while first < len(ordered):
        last = first
        while last + 1 < len(ordered) and ordered[last + 1] == ordered[last] + 1:
            last += 1
        start, stop = ordered[first], ordered[last]
        spans.append(str(start) if start == stop else f"{start}-{stop}")
        first = last + 1
    text = ", ".join(spans[:limit])
    return text + (f", ... ({len(spans) - limit} more ranges)" if len(spans) > limit else "")


@dataclass
class StreamStatistics:
    """Counts for one series, updated as the messages come.

    Attributes:
        series_id: the series received (``None`` until its first message).
        protocol: ``v1`` or ``v2`` once known.
        expected_frames: images the header announced, else ``None``.
        frames_received: image messages of the series taken as exposures (decoded or failed).
        frames_decoded: of these, with a frame (or one checked and left for the integrator
            processes to decode: ``decode_frames=False``).
        frames_failed: of these, with an error instead (images that never came are not
            counted here but in ``frames_missing``).
        frames_missing: image numbers that never came (final at the end of the iteration).
        missing_frames: those numbers.
        duplicate_frames: images whose number had been delivered already (dropped).
        out_of_order_frames: images with a lower number than one delivered before them.
        foreign_messages: messages of another series (dropped).
        rejected_messages: messages that could not be parsed at all (dropped).
        end_received: whether the series' end message came.
        timed_out: whether the iteration ended on ``idle_timeout_s`` of silence.
        errors: what went wrong, as text, oldest first (the first 1000).
        errors_dropped: how many more there were.

    >>> stats = StreamStatistics(series_id=3, expected_frames=4, frames_received=3,
    ...                          frames_decoded=3, frames_missing=1, missing_frames=[2])
    >>> stats.summary()
    'series 3: 3 of 4 images received (3 decoded, 0 failed), 1 missing (2), no end message'
    """

    series_id: int | None = None
    protocol: str | None = None
    expected_frames: int | None = None
    frames_received: int = 0
    frames_decoded: int = 0
    frames_failed: int = 0
    frames_missing: int = 0
    missing_frames: list[int] = field(default_factory=list)
    duplicate_frames: int = 0
    out_of_order_frames: int = 0
    foreign_messages: int = 0
    rejected_messages: int = 0
    end_received: bool = False
    timed_out: bool = False
    errors: list[str] = field(default_factory=list)
    errors_dropped: int = 0

    @property
    def complete(self) -> bool:
        """The end message came and no image is missing."""
        return self.end_received and self.frames_missing == 0 and self.series_id is not None

    def record(self, error: str) -> None:
        """Keep ``error`` and log it as a warning (only counted after the first 1000)."""
        if len(self.errors) < _MAX_ERRORS:
            log.warning("DECTRIS stream: %s", error)
            self.errors.append(error)
        else:
            log.debug("DECTRIS stream: %s", error)
            self.errors_dropped += 1

    def summary(self) -> str:
        """One line for a log or a report."""
        if self.series_id is None:
            return "no series received"
        of = f" of {self.expected_frames}" if self.expected_frames is not None else ""
        text = (
            f"series {self.series_id}: {self.frames_received}{of} images received "
            f"({self.frames_decoded} decoded, {self.frames_failed} failed)"
        )
        if self.frames_missing:
            text += f", {self.frames_missing} missing ({_ranges(self.missing_frames)})"
        for count, what in (
            (self.duplicate_frames, "duplicates dropped"),
            (self.out_of_order_frames, "out of order"),
            (self.foreign_messages, "messages of other series dropped"),
            (self.rejected_messages, "unreadable messages dropped"),
        ):
            if count:
                text += f", {count} {what}"
        if not self.end_received:
            text += ", no end message" + (" (idle timeout)" if self.timed_out else "")
        return text


@dataclass(frozen=True)
class SeriesEnded:
    """The series is over: call :meth:`SeriesAssembler.finish` and feed it nothing more.

    Attributes:
        series_id: the series that ended.
        next_series_id: ``None`` when its end message came; else the series whose header
            came before that end message (the header belongs to the next series: feed it to
            a new assembler).
    """

    series_id: int
    next_series_id: int | None = None


class SeriesAssembler:
    """The exposures of one series of a DECTRIS stream, from its parsed messages in the order
    they came (see the module docstring for what each message does).

    Args:
        source: where the messages come from (the stream's endpoint), for each exposure's
            ``metadata["source"]``.
        scan_id: the exposures' scan id; default the v2 ``series_unique_id`` or
            ``dectris-series-N``, fixed by the first header or image of the series.
        series_id: take only this series; messages of others are dropped and counted.
            Default: the series of the first message fed.
        require_header: fail the images that come before their series header (``True``), or
            decode them anyway (``False``).

    Attributes:
        statistics: what came, what was dropped and why, so far.
        header: the series header, once it came.
    """

    def __init__(
        self,
        source: str,
        scan_id: str | None = None,
        *,
        series_id: int | None = None,
        require_header: bool = True,
    ) -> None:
        self.source = source
        self.require_header = require_header
        self.statistics = StreamStatistics()
        self.header: SeriesHeader | None = None
        self._scan_id_given = scan_id
        self._scan_id_fixed: str | None = None
        self._wanted_series = series_id
        self._series: int | None = None
        self._delivered: set[int] = set()
        self._highest = -1

    @property
    def started(self) -> bool:
        """Whether a message of the series came (a header, an image or its end)."""
        return self._series is not None

    @property
    def channels(self) -> tuple[str, ...]:
        """The v2 channel names of the series header (to parse its images with), else ``()``."""
        return self.header.channels if self.header is not None else ()

    def reject(self, error: FormatError) -> None:
        """Count a message that could not be parsed (dropped)."""
        self.statistics.rejected_messages += 1
        self.statistics.record(f"dropped an unreadable message: {error}")

    def feed(self, message: StreamMessage, received_at: float) -> Exposure | SeriesEnded | None:
        """Take one message: an image of the series gives its exposure, its end or a header
        of the next series :class:`SeriesEnded`; anything else ``None`` (a header, or a
        message dropped and counted in :attr:`statistics`).

        Args:
            message: the message, parsed with :attr:`channels`.
            received_at: when it was taken from the socket, seconds since the epoch.
        """
        stats = self.statistics
        wanted = self._series if self._series is not None else self._wanted_series
        if wanted is not None and message.series_id != wanted:
            if isinstance(message, HeaderMessage) and self._series is not None:
                stats.record(
                    f"series {message.series_id} started before the end message of "
                    f"series {self._series}: ending series {self._series} as incomplete"
                )
                return SeriesEnded(self._series, next_series_id=message.series_id)
            stats.foreign_messages += 1
            article = "an" if message.kind in ("image", "end") else "a"
            stats.record(
                f"dropped {article} {message.kind} message of series {message.series_id} "
                f"(receiving series {wanted})"
            )
            return None
        if stats.protocol is not None and message.protocol != stats.protocol:
            stats.rejected_messages += 1
            stats.record(
                f"dropped a stream {message.protocol} {message.kind} message in a "
                f"stream {stats.protocol} series"
            )
            return None
        if self._series is None:
            self._series = stats.series_id = message.series_id
            stats.protocol = message.protocol
            if isinstance(message, EndMessage):
                stats.record(f"series {self._series} ended before any header or image of it came")
        if isinstance(message, HeaderMessage):
            self._take_header(message)
            return None
        if isinstance(message, EndMessage):
            for problem in message.problems:
                stats.record(f"series {self._series} end: {problem}")
            stats.end_received = True
            return SeriesEnded(self._series)
        return self._take_image(message, received_at)

    def _take_header(self, message: HeaderMessage) -> None:
        stats = self.statistics
        if self.header is not None:
            stats.record(f"ignored a repeated header of series {message.series_id}")
            return
        self.header = message.header
        self._scan_id()
        stats.expected_frames = message.header.n_images
        for problem in message.problems:
            stats.record(f"series {message.series_id} header: {problem}")

    def _take_image(self, message: ImageMessage, received_at: float) -> Exposure | None:
        stats = self.statistics
        number = message.image_number
        if number in self._delivered:
            stats.duplicate_frames += 1
            stats.record(
                f"dropped a second copy of image {number} of series {message.series_id} "
                "(the first one was delivered)"
            )
            return None
        exposure = self._exposure(message, received_at)
        if number < self._highest:
            stats.out_of_order_frames += 1
            exposure.metadata["out_of_order"] = "true"
        self._highest = max(self._highest, number)
        self._delivered.add(number)
        stats.frames_received += 1
        if exposure.error is None:
            stats.frames_decoded += 1
        else:
            stats.frames_failed += 1
            stats.record(exposure.error)
        return exposure

    def _scan_id(self) -> str:
        """The exposures' scan id, fixed the first time it is asked for."""
        if self._scan_id_fixed is None:
            if self._scan_id_given is not None:
                self._scan_id_fixed = self._scan_id_given
            elif self.header is not None and self.header.unique_id:
                self._scan_id_fixed = self.header.unique_id
            else:
                self._scan_id_fixed = f"dectris-series-{self._series}"
        return self._scan_id_fixed

    def _metadata(self, series: int, number: int, protocol: str | None) -> dict[str, str]:
        return {
            "source": f"{self.source} series {series} image {number}",
            "protocol": f"SIMPLON stream {protocol}",
            "series_id": str(series),
            "image_number": str(number),
        }

    def _exposure(self, message: ImageMessage, received_at: float) -> Exposure:
        series, number = message.series_id, message.image_number
        scan_id = self._scan_id()
        metadata = self._metadata(series, number, message.protocol) | dict(message.metadata)
        acquired_at = message.acquired_at
        if acquired_at is None and message.protocol == "v1":
            acquired_at = v1_acquired_at(message.metadata.get("start_time_ns"), self.header)
        frame, encoded, error = message.frame, message.encoded, message.error
        if self.header is None:
            metadata["header_missing"] = "true"
            if self.require_header and error is None:
                frame = encoded = None
                error = (
                    f"image {number} of series {series} came before the series header "
                    "(no dheader-1.0 / start message received): it cannot be checked against "
                    "the series configuration"
                )
        return Exposure(
            scan_id=scan_id,
            index=number,
            timestamp=acquired_at if acquired_at is not None else received_at,
            received_at=received_at,
            frame=frame,
            metadata=metadata,
            error=error,
            encoded=encoded,
        )

    def time_out(self, waited_s: float) -> None:
        """Record that nothing came for ``waited_s`` (the receiver's limit) and the series
        is given up: none started, or it is incomplete."""
        stats = self.statistics
        stats.timed_out = True
        if self._series is None:
            stats.record(f"no series started within {waited_s:g} s")
        else:
            stats.record(
                f"no message for {waited_s:g} s and no end message of "
                f"series {self._series}: the series is incomplete"
            )

    def stop(self) -> None:
        """Record that the receiver was stopped before the end message."""
        self.statistics.record("stopped before the end message")

    def finish(self, now: float) -> list[Exposure]:
        """Close the series' statistics (once, when it is over) and return a failed exposure,
        timestamped ``now`` (seconds since the epoch), for every image that never came."""
        stats = self.statistics
        series = self._series
        if series is None:
            return []
        expected = stats.expected_frames
        end = expected if expected is not None else self._highest + 1
        stats.missing_frames = [n for n in range(end) if n not in self._delivered]
        stats.frames_missing = len(stats.missing_frames)
        if expected is not None and self._highest >= expected:
            stats.record(
                f"series {series} announced {expected} images but image {self._highest} came"
            )
        if stats.frames_missing:
            stats.record(
                f"series {series} incomplete: {stats.frames_received}"
                + (f" of {expected}" if expected is not None else "")
                + f" images received, missing: {_ranges(stats.missing_frames)}"
            )
        reason = (
            "the end message came without it"
            if stats.end_received
            else "the stream ended without an end message"
        )
        return [
            Exposure(
                scan_id=self._scan_id(),
                index=number,
                timestamp=now,
                frame=None,
                metadata=self._metadata(series, number, stats.protocol) | {"missing": "true"},
                error=f"image {number} of series {series} never arrived ({reason})",
            )
            for number in stats.missing_frames
        ]
