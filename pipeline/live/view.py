"""What a scan's live page shows, gathered without slowing the scan (:class:`LiveScanView`).

Everything about the exposures comes from the results file, read as it is written (SWMR),
only the rows added since the last look, and only when someone looks (at most every
``poll_s``): status, posterior, quality flag, error and source file. So the page shows what
the file holds, the newest exposure as soon as its row is written, and a scan nobody
watches pays nothing. The feeding side adds two things the file cannot know, both cheap:

- :meth:`LiveScanView.follow`, where the counts come from (:class:`ScanCounts`: the
  feeder's counters, read at each look, so that the page need not read every row);
- :meth:`LiveScanView.offer`, an exposure whose frame may become the thumbnail: a strided
  copy (:class:`Thumbnail`) is taken only when the page asked for a new one (at most once
  per ``thumbnail_s``).

:meth:`LiveScanView.state` gives a :class:`LiveState`: counts, rate, the newest exposures,
the alarms (:class:`Alarm`: failing, flagging, stalled, feed silent), for the page's JSON.

Example:
    >>> import tempfile
    >>> from pipeline.store import ExposureResult, ResultsWriter
    >>> path = Path(tempfile.mkdtemp()) / "scan.h5"
    >>> names = ("pitch_nm", "width_nm", "sigma_nm")
    >>> with ResultsWriter(path, names, ("nm",) * 3, 4, np.linspace(0.01, 0.4, 512)) as w:
    ...     w.append(ExposureResult(0, 0.0, status="failed", error="truncated", source="f_0.cbf"))
    True
    >>> view = LiveScanView("doc", path)
    >>> view.follow(lambda: ScanCounts(taken=1, written=0, failed=1, flagged=0))
    >>> state = view.state()
    >>> state.failed, state.rows[0].error, state.rows[0].source, [a.name for a in state.alarms]
    (1, 'truncated', 'f_0.cbf', ['failing'])
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.exposure import Exposure
from pipeline.physics import GRATING_PARAMETERS
from pipeline.sources.compression import FormatError
from pipeline.store.reader import rows_since

#: Columns read for the traces (every row, thinned) and for the table (the newest rows).
#: Looks kept for the counts over time (then every other one is dropped).
MAX_HISTORY = 1000
_TRACE_COLUMNS = ("index", "status", "quantiles", "flagged")
_TABLE_COLUMNS = (*_TRACE_COLUMNS, "written_time", "predictive_z", "error", "source")


@dataclass(frozen=True)
class AlarmThresholds:
    """When the page raises an alarm (seconds).

    Attributes:
        recent_s: a failed or flagged exposure written this recently makes the scan
            *failing* or *flagging*.
        stalled_s: exposures taken but none written for this long: *stalled*.
        silent_s: a live source that gave no exposure for this long: *feed silent*.
    """

    recent_s: float = 60.0
    stalled_s: float = 10.0
    silent_s: float = 30.0


@dataclass(frozen=True)
class ScanCounts:
    """A scan's exposures so far: taken from the source, and of those the writer
    acknowledged, written with a posterior, failed, and (of the written) flagged."""

    taken: int = 0
    written: int = 0
    failed: int = 0
    flagged: int = 0


@dataclass(frozen=True)
class Alarm:
    """One alarm: ``name`` (failing, flagging, stalled, feed silent), ``level`` (``red``:
    data are being lost or not made; ``amber``: look), and what it is, in words."""

    name: str
    level: str
    detail: str


@dataclass(frozen=True)
class ExposureRow:
    """One row of the results file as the page shows it; ``medians`` and ``intervals`` are
    of pitch, width and sigma (nm; intervals 5-95%), NaN for a failed exposure."""

    index: int
    status: str
    written_time: float
    medians: tuple[float, ...]
    intervals: tuple[tuple[float, float], ...]
    predictive_z: float
    flagged: bool
    error: str
    source: str


@dataclass(frozen=True)
class LiveState:
    """A scan as the page shows it at ``checked_at`` (s since the epoch).

    Attributes:
        taken: exposures taken from the source (received) so far.
        written, failed, flagged: rows of the results file: written with a posterior, failed,
            and, of the written, flagged by the quality check.
        rate_hz: rows written per second over the last minute.
        rows: the newest rows, newest first.
        alarms: what needs the operator's eye (none: all well).
        figure_version: changes when the figure would show something new.
    """

    scan_id: str
    running: bool
    checked_at: float
    taken: int
    written: int
    failed: int
    flagged: int
    rate_hz: float
    rows: tuple[ExposureRow, ...]
    alarms: tuple[Alarm, ...]
    figure_version: int

    def to_json(self) -> dict[str, object]:
        """The state as JSON types (NaN as ``None``), for the page's script."""
        state = asdict(self) | {"parameters": list(GRATING_PARAMETERS)}
        return {key: _finite(value) for key, value in state.items()}


@dataclass
class Thumbnail:
    """A detector frame of exposure ``index``, every ``stride``-th pixel of each axis of a
    frame of ``shape`` (a copy of a ninth of a large frame: about a millisecond)."""

    index: int
    sample: np.ndarray
    stride: int
    shape: tuple[int, int]

    #: Pixels along the longer side of :meth:`image`.
    SIDE = 256

    def image(self) -> tuple[np.ndarray, int]:
        """The frame at most :data:`SIDE` pixels a side, each the brightest of its block of
        the sample (sparse photons stay visible), and the stride in detector pixels."""
        block = max(1, -(-max(self.sample.shape) // self.SIDE))
        rows, columns = (size // block for size in self.sample.shape)
        blocks = self.sample[: rows * block, : columns * block].reshape(rows, block, columns, block)
        return blocks.max(axis=(1, 3)), self.stride * block


@dataclass
class Traces:
    """The 5/50/95% quantiles of pitch, width and sigma across the scan, thinned to at most
    ``2 * max_points`` points: every ``step``-th row of the file (the step doubles as the
    scan grows)."""

    max_points: int = 2000
    step: int = 1
    index: list[int] = field(default_factory=list)
    ok: list[bool] = field(default_factory=list)
    quantiles: list[np.ndarray] = field(default_factory=list)
    flagged: list[bool] = field(default_factory=list)

    def step_for(self, new_rows: int) -> int:
        """The step to read ``new_rows`` more rows with, so that at most ``2 * max_points``
        points are kept (the points kept so far are thinned to match)."""
        while len(self.index) + new_rows // self.step > 2 * self.max_points:
            self._thin()
        return self.step

    def _thin(self) -> None:
        self.index = self.index[::2]
        self.ok = self.ok[::2]
        self.quantiles = self.quantiles[::2]
        self.flagged = self.flagged[::2]
        self.step *= 2

    def extend(self, rows: dict[str, np.ndarray]) -> None:
        """Add rows read with :attr:`step` (failed ones too, so that the k-th point stays
        the row ``k * step``; :meth:`arrays` leaves them out)."""
        self.index.extend(int(i) for i in rows["index"])
        self.ok.extend(bool(status == "ok") for status in rows["status"])
        self.quantiles.extend(rows["quantiles"][:, :, : len(GRATING_PARAMETERS)])
        self.flagged.extend(bool(f) for f in rows["flagged"])
        if len(self.index) > 2 * self.max_points:
            self._thin()

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Of the exposures with a posterior: indices (n,), quantiles (n, 3 levels, 3
        parameters), flags (n,)."""
        ok = np.array(self.ok, bool)
        quantiles = np.array(self.quantiles).reshape(-1, 3, len(GRATING_PARAMETERS))
        return (
            np.array(self.index, np.int64)[ok],
            quantiles[ok],
            np.array(self.flagged, bool)[ok],
        )


class LiveScanView:
    """A running scan, for its live page (see the module docstring).

    Args:
        scan_id: the scan.
        results_path: its results file (it may not exist yet).
        live: the source is live (a stream, a watched folder): it may go silent.
        thresholds: when alarms are raised.
        poll_s: the file is read again at most this often (seconds).
        thumbnail_s: a new thumbnail is taken at most this often (seconds).
        max_rows: rows of the table.
        max_points: points of each trace (up to twice as many: :class:`Traces`).
        clock: seconds since the epoch (tests pass their own).
    """

    def __init__(
        self,
        scan_id: str,
        results_path: Path,
        live: bool = False,
        thresholds: AlarmThresholds = AlarmThresholds(),
        poll_s: float = 0.5,
        thumbnail_s: float = 1.0,
        max_rows: int = 15,
        max_points: int = 2000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.scan_id = scan_id
        self.results_path = Path(results_path)
        self.live = live
        self.thresholds = thresholds
        self.poll_s = poll_s
        self.thumbnail_s = thumbnail_s
        self.max_rows = max_rows
        self._clock = clock
        self._lock = threading.Lock()
        started = clock()
        self._running = True
        self._count: Callable[[], ScanCounts] = ScanCounts
        self._counts = ScanCounts()
        self._taken_changed_at = started
        self._want_thumbnail = True
        self._thumbnail: Thumbnail | None = None
        self._thumbnail_at = -math.inf
        self._rows_read = 0  # rows of the file looked at
        self._traces = Traces(max_points)
        self._newest: tuple[ExposureRow, ...] = ()
        self._written_at: list[tuple[float, int]] = [(started, 0)]  # (time, rows) samples
        self._history: list[tuple[float, int, int, int, int]] = []
        self._last_failed_at = -math.inf
        self._last_flagged_at = -math.inf
        self._last_row_at = started
        self._version = 0
        self._state: LiveState | None = None
        #: why the file could not be read at the last look ("": it could)
        self.read_error = ""

    # -- the feeding side --------------------------------------------------------------------
    def follow(self, counts: Callable[[], ScanCounts]) -> None:
        """Count the scan with ``counts``, called at each look (from the page's thread: it
        must only read, e.g. the feeder's counters)."""
        self._count = counts

    def offer(self, exposure: Exposure) -> None:
        """An exposure just taken: its frame becomes the thumbnail if the page wants a new
        one (a strided copy, at most one per ``thumbnail_s``); otherwise nothing is done."""
        if not self._want_thumbnail:
            return
        try:  # a frame left compressed for the integrator processes is decoded here
            frame = exposure.image()
        except FormatError:  # (its failure reaches the file through the integrators)
            return
        if frame is None or frame.ndim != 2:
            return
        self._want_thumbnail = False
        stride = max(1, -(-max(frame.shape) // (3 * Thumbnail.SIDE)))
        sample = np.array(frame[::stride, ::stride], dtype=np.float32)
        with self._lock:
            self._thumbnail = Thumbnail(exposure.index, sample, stride, frame.shape[:2])
            self._thumbnail_at = self._clock()
            self._version += 1

    def sampled(self, exposures: Iterator[Exposure]) -> Iterator[Exposure]:
        """``exposures``, each offered (:meth:`offer`) as it passes."""
        for exposure in exposures:
            self.offer(exposure)
            yield exposure

    def finish(self) -> None:
        """The scan has ended: no more alarms for silence or stalls."""
        self._running = False
        self._state = None

    # -- the page's side ---------------------------------------------------------------------
    @property
    def thumbnail(self) -> Thumbnail | None:
        """The newest thumbnail taken."""
        return self._thumbnail

    def traces(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The traces so far (:meth:`Traces.arrays`)."""
        with self._lock:
            return self._traces.arrays()

    def history(self) -> np.ndarray:
        """The counts at each look, (looks, 5): time (s since the epoch), taken, written,
        failed, flagged; at most ``2 * MAX_HISTORY`` looks (every other one is dropped
        as the scan grows)."""
        with self._lock:
            return np.array(self._history, dtype=np.float64).reshape(-1, 5)

    def state(self) -> LiveState:
        """The scan now: the rows written since the last look are read first (at most every
        ``poll_s``), and a new thumbnail is asked for."""
        now = self._clock()
        with self._lock:
            if self._state is not None and now - self._state.checked_at < self.poll_s:
                return self._state
            if now - self._thumbnail_at >= self.thumbnail_s:
                self._want_thumbnail = True
            self._read_new_rows(now)
            self._take_counts(now)
            counts = self._counts
            self._history.append((now, counts.taken, counts.written, counts.failed, counts.flagged))
            if len(self._history) > 2 * MAX_HISTORY:
                self._history = self._history[::2]
            self._state = LiveState(
                scan_id=self.scan_id,
                running=self._running,
                checked_at=now,
                taken=counts.taken,
                written=counts.written,
                failed=counts.failed,
                flagged=counts.flagged,
                rate_hz=self._rate_hz(now),
                rows=self._newest,
                alarms=self._alarms(now),
                figure_version=self._version,
            )
            return self._state

    def _read_new_rows(self, now: float) -> None:
        """Read the rows written since the last look: the newest for the table, every
        :attr:`Traces.step`-th for the traces."""
        if not self.results_path.exists():
            return
        try:
            n, table = rows_since(self.results_path, _TABLE_COLUMNS, start=-self.max_rows)
            new = n - self._rows_read
            if new <= 0:
                return
            step = self._traces.step_for(new)
            first = self._rows_read + (-self._rows_read % step)  # rows at multiples of step
            _, traces = rows_since(self.results_path, _TRACE_COLUMNS, first, n, step)
        except (OSError, KeyError, ValueError) as error:  # not made yet, or being replaced
            self.read_error = str(error)
            return
        self.read_error = ""
        self._traces.extend(traces)
        self._rows_read = n
        self._last_row_at = now
        self._written_at = [(t, rows) for t, rows in self._written_at if now - t <= 60.0]
        self._written_at.append((now, n))
        shown = min(new, len(table["index"]))
        newest = [_row(table, i) for i in range(len(table["index"]) - 1, -1, -1)][:shown]
        self._newest = (*newest, *self._newest)[: self.max_rows]
        self._version += 1

    def _take_counts(self, now: float) -> None:
        counts, before = self._count(), self._counts
        if counts.taken != before.taken:
            self._taken_changed_at = now
        if counts.failed > before.failed:
            self._last_failed_at = now
        if counts.flagged > before.flagged:
            self._last_flagged_at = now
        self._counts = counts

    def _rate_hz(self, now: float) -> float:
        (then, rows_then), (_, rows_now) = self._written_at[0], self._written_at[-1]
        return (rows_now - rows_then) / max(now - then, 1e-3) if now > then else 0.0

    def _alarms(self, now: float) -> tuple[Alarm, ...]:
        limits, alarms = self.thresholds, []
        if now - self._last_failed_at <= limits.recent_s:
            alarms.append(Alarm("failing", "red", f"{self._counts.failed} failed so far"))
        if now - self._last_flagged_at <= limits.recent_s:
            alarms.append(
                Alarm("flagging", "amber", f"{self._counts.flagged} not explained by a grating")
            )
        waiting = self._counts.taken - self._counts.written - self._counts.failed
        if self._running and waiting > 0 and now - self._last_row_at >= limits.stalled_s:
            alarms.append(
                Alarm(
                    "stalled",
                    "red",
                    f"{waiting} taken but none written for {now - self._last_row_at:.0f} s",
                )
            )
        silent_s = now - self._taken_changed_at
        if self._running and self.live and silent_s >= limits.silent_s:
            alarms.append(Alarm("feed silent", "amber", f"no frame for {silent_s:.0f} s"))
        return tuple(alarms)


def _row(table: dict[str, np.ndarray], i: int) -> ExposureRow:
    quantiles = table["quantiles"][i][:, : len(GRATING_PARAMETERS)].astype(float)
    return ExposureRow(
        index=int(table["index"][i]),
        status=str(table["status"][i]),
        written_time=float(table["written_time"][i]),
        medians=tuple(float(q) for q in quantiles[1]),
        intervals=tuple(
            (float(lo), float(hi)) for lo, hi in zip(quantiles[0], quantiles[2], strict=True)
        ),
        predictive_z=float(table["predictive_z"][i]),
        flagged=bool(table["flagged"][i]),
        error=str(table["error"][i]),
        source=str(table["source"][i]),
    )


def _finite(value: object) -> object:
    """``value`` with NaN and infinities as ``None`` (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
