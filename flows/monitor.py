"""Watching a scan in the Prefect UI: progress, recent exposures, traces, events, run logs, a
summary.

:class:`ScanMonitor` is fed by the feeder, which calls :meth:`ScanMonitor.record` for each
exposure the writer acknowledges (bookkeeping under a lock: microseconds) and
:meth:`ScanMonitor.update` with the counts whenever it likes (a live scan at least every
0.5 s, frames or not). A thread of its own publishes to Prefect, each kind at most once per
its interval (:class:`MonitorIntervals`), so the feeder never waits for the API, and a scan
of any length makes a bounded number of API calls and stores a bounded number of artifact
versions. Every key names the scan (:func:`scan_key`), so scans do not share a history:

- ``scan-progress-<scan>``: one progress artifact, updated in place (never a new version)
  when the counts change, at most every ``progress_s`` (1 s): the percentage of exposures
  written without failure (never 100% on a scan with failed ones) and, as its description,
  ``N of M written, F failed, G flagged; newest exposure K``;
- ``recent-exposures-<scan>``: a table of the newest exposures: posterior median and 90%
  interval of pitch, width and sigma, the quality flag (posterior-predictive z), the latency
  from hand-over to written, the error of a failed one. Its newest version is updated in
  place every ``table_s`` (5 s) while exposures come; a new version only every
  ``table_version_s`` (10 min), so the older versions are a sparse history;
- ``scan-plots-<scan>``: an image (a PNG as a ``data:`` URL): the traces across the scan and
  the newest exposure's posterior marginals, read from the results file as it is written;
  updated in place every ``plot_s`` (15 s), a new version every ``plot_version_s`` (2 h);
- events ``beamline-inn.exposures.flagged`` and ``beamline-inn.exposures.failed`` (at most one
  of each per ``events_s``, 5 s, with the count and the exposures), and
  ``beamline-inn.writer.restarted`` (one per restart of the results writer, with its exit
  code and the exposures sent again);
- events ``beamline-inn.feed.silent``, once when no exposure was submitted for
  ``feed_silent_s`` (30 s; counted from the monitor's start too: a detector that never sends
  is silent), and ``beamline-inn.feed.resumed`` when exposures come again, with the counts;
- events ``beamline-inn.scan.started``, and ``beamline-inn.scan.finished`` or
  ``beamline-inn.scan.failed`` when it ends, with the counts (submitted, written, failed,
  flagged) in their payload;
- ``scan-summary-<scan>``: a markdown artifact when the scan ends (:meth:`ScanMonitor.finish`).

Updates in place go to the API's PATCH themselves: Prefect's own update functions also emit
an event holding the whole new data (a plot: about 190 kB), which the server keeps for its
event retention (7 days).

The events are on the resource ``beamline-inn.scan.<scan id>`` and related to the run. The
run's log gets, at most once per ``log_problems_s`` (30 s), one line counting the exposures
that failed or were flagged since the last and naming the first few; a line when the feed
falls silent or resumes; and the warnings of the library's loggers (``pipeline``,
``workers`` and their children) while the monitor lives: at most ``log_lines_per_window``
per ``log_window_s`` (10 a minute), then one line saying how many were left out. Their
handler only queues (the feeder logs from its thread); the monitor's thread sends them.

A Prefect API that cannot be reached does not stop the scan: the failed update is logged,
the next one is tried at its time, and the log says when the API answers again.
"""

from __future__ import annotations

import base64
import contextvars
import dataclasses
import hashlib
import json
import logging
import re
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import numpy as np
from prefect import get_run_logger
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.context import get_run_context
from prefect.events import emit_event

from pipeline.physics import GRATING_PARAMETERS, PARAMETER_NAMES
from pipeline.store import latest_posterior
from pipeline.store.views import live_view_png
from workers.feeder import RecentResult, WriterRestarted

log = logging.getLogger(__name__)

#: An update slower than this (seconds) means the API was unreachable or slow: logged.
SLOW_UPDATE_S = 10.0

EVENT_FLAGGED = "beamline-inn.exposures.flagged"
EVENT_FAILED = "beamline-inn.exposures.failed"
EVENT_WRITER_RESTARTED = "beamline-inn.writer.restarted"
EVENT_FEED_SILENT = "beamline-inn.feed.silent"
EVENT_FEED_RESUMED = "beamline-inn.feed.resumed"
#: A scan's start and end: ``beamline-inn.scan.started``, ``.finished`` (it ran to its end,
#: whatever its exposures' outcome) or ``.failed`` (it stopped on an error), with the counts.
EVENT_SCAN = "beamline-inn.scan.{}"
#: Rows of the recent-exposures table.
TABLE_ROWS = 20
#: Exposures listed by name in one event, and in the summary (the count covers them all).
EVENT_EXPOSURES = 100
#: Exposures listed by name in one line of the run's log, and the characters of an error kept.
LOG_EXPOSURES = 5
LOG_ERROR_CHARS = 100
#: The loggers whose warnings reach the run's log while a monitor lives (children included).
FORWARDED_LOGGERS = ("pipeline", "workers")
#: Warnings queued between two rounds of the monitor's thread; more are counted as left out.
WARNING_QUEUE = 1000
#: Characters of one forwarded warning kept.
WARNING_CHARS = 200
_COLUMNS = [PARAMETER_NAMES.index(name) for name in GRATING_PARAMETERS]
_KEY_CHARACTERS = re.compile(r"[^a-z0-9-]")
_FAILED_CALL = object()  # what _call returns when the API call failed


@dataclass(frozen=True)
class MonitorIntervals:
    """Least time between two updates of each kind, in seconds (see the module docstring),
    and the rate limit of the warnings forwarded to the run's log.

    With the defaults a 12-hour scan stores 73 table versions (about 6 kB each) and 7 plot
    versions (about 190 kB each), 1.8 MB, and at most 2.7 MB of run-log lines: under the
    5 MB that ``benchmarks/orchestration.py`` measures it against (docs/orchestration.md).
    ``plot_s`` is also about how often a plot is drawn (0.4-0.9 s of CPU each)."""

    progress_s: float = 1.0
    table_s: float = 5.0
    plot_s: float = 15.0
    events_s: float = 5.0
    table_version_s: float = 600.0
    plot_version_s: float = 7200.0
    feed_silent_s: float = 30.0
    log_window_s: float = 60.0
    log_lines_per_window: int = 10
    log_problems_s: float = 30.0

    def scaled(self, factor: float) -> MonitorIntervals:
        """These intervals divided by ``factor`` (the lines per window kept): a scan run
        ``factor`` times faster makes the updates, versions and events of the real one."""
        return dataclasses.replace(
            self,
            **{
                field.name: getattr(self, field.name) / factor
                for field in dataclasses.fields(self)
                if field.name.endswith("_s")
            },
        )


def scan_key(scan_id: str) -> str:
    """The scan id as Prefect's artifact keys allow it (lower-case letters, digits, dashes).

    An id made of those only is kept as it is. Any other (capitals, ``_`` or ``.``, which
    scan ids may hold: :data:`pipeline.config.SCAN_ID_PATTERN`) is lower-cased, its other
    characters turned into dashes, and the first 8 hex digits of its SHA-256 appended, so
    that ids that differ only there (``Scan_1``, ``scan.1``, ``scan-1``) keep keys apart. Two
    ids share a key only when the hashes of two changed ids collide (about 1 in 4e9 per
    pair) or when a scan is named exactly as another's key (``scan-1-52f4332c``).

    >>> scan_key("sim-20261128-120000")
    'sim-20261128-120000'
    >>> scan_key("Scan_1"), scan_key("scan.1")
    ('scan-1-52f4332c', 'scan-1-a33aed47')
    """
    key = _KEY_CHARACTERS.sub("-", scan_id.lower())
    if key == scan_id:
        return key
    return f"{key}-{hashlib.sha256(scan_id.encode()).hexdigest()[:8]}"


class _WarningQueue(logging.Handler):
    """Takes the warnings of the library's loggers, from whatever thread logs them, into a
    bounded queue (an append under the handler's lock: it never waits for the API); the
    monitor's thread sends them on (:meth:`take`)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._records: deque[tuple[int, str]] = deque()
        self._overflowed = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(self._records) >= WARNING_QUEUE:
            self._overflowed += 1
            return
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: reported as logging reports it
            self.handleError(record)
            return
        error = record.exc_info[1] if record.exc_info else None
        if error is not None:
            message += f" ({type(error).__name__}: {error})"
        self._records.append((record.levelno, f"{record.name}: {message}"[:WARNING_CHARS]))

    def take(self) -> tuple[list[tuple[int, str]], int]:
        """The queued warnings (level, text), and how many did not fit the queue."""
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            records, self._records = list(self._records), deque()
            overflowed, self._overflowed = self._overflowed, 0
        return records, overflowed


class ScanMonitor:
    """Publishes a scan's progress, recent exposures, plots, alerts and log lines to Prefect
    (see the module docstring); create it inside a flow or task run, whose context and run
    logger its thread keeps.

    Args:
        scan_id: the scan, in the artifacts' keys (:func:`scan_key`) and descriptions, and in
            the events' resource.
        results_path: the scan's results file, read (SWMR) for the newest posterior.
        expected: exposures the scan will have, when known (else the progress is of those
            submitted so far).
        intervals: the rate limits.
    """

    def __init__(
        self,
        scan_id: str,
        results_path: Path,
        expected: int | None = None,
        intervals: MonitorIntervals = MonitorIntervals(),
    ) -> None:
        self.scan_id = scan_id
        self.results_path = Path(results_path)
        self.expected = expected
        self.intervals = intervals
        key = scan_key(scan_id)
        #: the artifacts' keys, by kind: progress, table, plot, summary
        self.keys = {
            "progress": f"scan-progress-{key}",
            "table": f"recent-exposures-{key}",
            "plot": f"scan-plots-{key}",
            "summary": f"scan-summary-{key}",
        }
        self._lock = threading.Lock()
        self._recent: deque[RecentResult] = deque(maxlen=TABLE_ROWS)
        self._index = array("q")  # exposures with a posterior, in acknowledgement order
        self._quantiles = array("d")  # 9 per exposure: (5/50/95%) x (pitch, width, sigma)
        self._flagged = array("b")
        self._new_flagged: list[tuple[int, float]] = []
        self._new_failed: list[tuple[int, str]] = []
        self._listed_flagged: list[tuple[int, float]] = []  # the first ones, for the summary
        self._listed_failed: list[tuple[int, str]] = []
        # since the last line of the run's log about them: counts, and the first ones
        self._unlogged = {"failed": 0, "flagged": 0}
        self._unlogged_failed: list[tuple[int, str]] = []
        self._unlogged_flagged: list[tuple[int, float]] = []
        self._writer_restarts: list[WriterRestarted] = []
        self._total = 0
        self._newest: int | None = None  # the exposure acknowledged last
        self._counts = {"written": 0, "failed": 0, "flagged": 0}  # acknowledged so far
        self._changed = {"table": False, "plot": False}
        self._last = dict.fromkeys(("progress", "table", "plot", "events", "problems"), 0.0)
        self._shown_progress = ""  # the progress description last published
        self._versions: dict[str, tuple[UUID, float]] = {}  # kind: newest version, created at
        started = time.monotonic()
        self._total_changed_at = started  # when update() last saw a new ``total``
        self._silent_since: float | None = None  # a silent feed announced: since when
        self._silent_total = 0  # the exposures submitted when it fell silent
        self._window_started = started  # of the forwarded warnings' rate limit
        self._window_sent = 0
        self._left_out = 0
        self._api_failures = 0
        #: updates published, by kind (``table``, ``plot``: in place or as a new version;
        #: ``table_versions``, ``plot_versions``: new versions; ``log_lines``: lines sent to
        #: the run's log), for tests and the benchmark
        self.published = dict.fromkeys(
            ("progress", "table", "plot", "events", "table_versions", "plot_versions", "log_lines"),
            0,
        )
        self._stop = threading.Event()
        self._abandoned = False  # see abandon()
        self._reading = threading.Lock()  # held while a plot reads the results file
        run_context = get_run_context()  # a flow run's, or a task run's (on a Dask worker)
        self._related = [
            {"prefect.resource.id": f"prefect.{kind}.{run.id}", "prefect.resource.role": kind}
            for kind, run in (
                ("flow-run", getattr(run_context, "flow_run", None)),
                ("task-run", getattr(run_context, "task_run", None)),
            )
            if run is not None
        ]
        self._run_log = get_run_logger()
        self._progress_id = None
        try:
            self._progress_id = create_progress_artifact(
                0.0, key=self.keys["progress"], description=self._progress_text()
            )
            self._shown_progress = self._progress_text()
        except Exception as error:  # the API is down: the scan starts all the same
            self._api_failures = 1
            log.warning("Prefect progress artifact not created, the scan goes on: %s", error)
        self._scan_event("started")
        self._warnings = _WarningQueue()
        for name in FORWARDED_LOGGERS:
            logging.getLogger(name).addHandler(self._warnings)
        context = contextvars.copy_context()  # the run's, so artifacts and logs attach to it
        self._thread = threading.Thread(
            target=context.run, args=(self._publish_loop,), name="prefect-monitor", daemon=True
        )
        self._thread.start()

    # -- the feeder's side: bookkeeping only -------------------------------------------------
    def record(self, result: RecentResult) -> None:
        """Take one acknowledged exposure (called by the feeder, once per exposure)."""
        with self._lock:
            self._recent.append(result)
            self._newest = result.index
            self._changed["table"] = True
            if result.status != "ok":
                self._counts["failed"] += 1
                self._new_failed.append((result.index, result.error))
                if len(self._listed_failed) < EVENT_EXPOSURES:
                    self._listed_failed.append((result.index, result.error))
                return
            self._counts["written"] += 1
            self._counts["flagged"] += result.flagged
            self._index.append(result.index)
            for level in result.quantiles:
                self._quantiles.extend(level[column] for column in _COLUMNS)
            self._flagged.append(result.flagged)
            self._changed["plot"] = True
            if result.flagged:
                self._new_flagged.append((result.index, result.predictive_z))
                if len(self._listed_flagged) < EVENT_EXPOSURES:
                    self._listed_flagged.append((result.index, result.predictive_z))

    def writer_restarted(self, restarted: WriterRestarted) -> None:
        """Take a restart of the results writer (called by the feeder): an event soon."""
        with self._lock:
            self._writer_restarts.append(restarted)
        self._last["events"] = 0.0  # published with the next round, not after events_s

    def update(self, done: int, total: int) -> None:
        """The exposures acknowledged (written or failed) and submitted so far, as the
        feeder reports progress (:meth:`~workers.feeder.Feeder.wait`); the progress shown
        counts those written without failure, from :meth:`record`, over ``total``, and a
        ``total`` that stays the same for ``feed_silent_s`` is a silent feed."""
        if total != self._total:
            self._total_changed_at = time.monotonic()  # first: the thread reads it second
            self._total = total

    def finish(self, summary_markdown: str, failed: bool = False, timeout_s: float = 30.0) -> None:
        """Publish everything a last time, then the summary (markdown; the exposures flagged
        in this run are added, and for a scan that ``failed``, the counts and failures so
        far) and the scan's ``finished`` event (``failed``: the ``failed`` event); stop the
        thread and the forwarding of warnings. Call it also when the scan failed, with what
        is known, or the thread goes on."""
        self._stop_forwarding()  # what is queued is still sent by the last round
        self._stop.set()
        self._thread.join(timeout_s)
        self._scan_event("failed" if failed else "finished")
        self._call(
            "summary",
            create_markdown_artifact,
            summary_markdown + self._summary_addendum(failed),
            key=self.keys["summary"],
            description=f"Scan {self.scan_id}: summary",
        )

    def abandon(self) -> None:
        """Stop publishing, without a last update or a summary (Ctrl-C: the run ends, and its
        API client closes): no update starts any more, and one under way that fails is not
        logged; warnings are no longer forwarded. Returns once no plot reads the results file
        (a read takes milliseconds), so that the writer can close it; :meth:`join` waits for
        the rest of that update."""
        self._abandoned = True
        self._stop_forwarding()
        self._stop.set()
        with self._reading:
            pass

    def join(self, timeout_s: float = 3.0) -> None:
        """Wait up to ``timeout_s`` for the publishing thread to end once :meth:`abandon`
        stopped it (a thread still drawing when the process ends can crash it)."""
        self._thread.join(timeout_s)

    def _stop_forwarding(self) -> None:
        for name in FORWARDED_LOGGERS:
            logging.getLogger(name).removeHandler(self._warnings)

    # -- the thread's side -------------------------------------------------------------------
    def _publish_loop(self) -> None:
        tick = min(
            self.intervals.progress_s,
            self.intervals.table_s,
            self.intervals.plot_s,
            self.intervals.events_s,
        )
        while not self._stop.wait(tick):
            self._publish(final=False)
        if not self._abandoned:
            self._publish(final=True)

    def _due(self, kind: str, interval_s: float, final: bool) -> bool:
        now = time.monotonic()
        if final or now - self._last[kind] >= interval_s:
            self._last[kind] = now
            return True
        return False

    def _publish(self, final: bool) -> None:
        if self._progress_id is not None and self._due(
            "progress", self.intervals.progress_s, final
        ):
            self._publish_progress()
        if not final:
            self._watch_feed()
        if self._due("events", self.intervals.events_s, final):
            self._emit_events()
        if self._due("problems", self.intervals.log_problems_s, final):
            self._log_problems()
        if self._changed["table"] and self._due("table", self.intervals.table_s, final):
            self._publish_table()
        if self._changed["plot"] and self._due("plot", self.intervals.plot_s, final):
            self._publish_plot()
        self._forward_warnings(final)

    def _progress_text(self) -> str:
        """``Scan S: N of M written, F failed, G flagged; newest exposure K``."""
        with self._lock:
            counts, newest = dict(self._counts), self._newest
        total = self.expected or self._total
        newest_text = "no exposure yet" if newest is None else f"newest exposure {newest}"
        return (
            f"Scan {self.scan_id}: {counts['written']} of {total} written, {counts['failed']} "
            f"failed, {counts['flagged']} flagged; {newest_text}"
        )

    def _publish_progress(self) -> None:
        """The progress and its description, in place, when they changed."""
        text = self._progress_text()
        if text == self._shown_progress:
            return
        percent = 100.0 * self._counts["written"] / max(self.expected or self._total, 1)
        result = self._call(
            "progress", _update_artifact, self._progress_id, min(percent, 100.0), text
        )
        if result is not _FAILED_CALL:
            self._shown_progress = text

    def _watch_feed(self) -> None:
        """Announce a feed silent for ``feed_silent_s`` (once), and its return."""
        total, changed_at = self._total, self._total_changed_at
        if self._silent_since is not None:
            if total != self._silent_total:
                silent_s = changed_at - self._silent_since
                self._silent_since = None
                self._feed_event(EVENT_FEED_RESUMED, silent_s)
                self._run_log.info(
                    "exposures come again after %.0f s without one (%d submitted)",
                    silent_s,
                    total,
                )
        elif (silent_s := time.monotonic() - changed_at) >= self.intervals.feed_silent_s:
            self._silent_since, self._silent_total = changed_at, total
            self._feed_event(EVENT_FEED_SILENT, silent_s)
            self._run_log.warning(
                "no exposure submitted for %.0f s (%d so far): is the detector sending?",
                silent_s,
                total,
            )

    def _feed_event(self, event: str, silent_s: float) -> None:
        with self._lock:
            payload: dict[str, object] = {"submitted": self._total}
            payload |= self._counts
        payload |= {"silent_s": round(silent_s, 1), "results": str(self.results_path)}
        self._call(
            "events",
            emit_event,
            event=event,
            resource=self._resource,
            related=self._related,
            payload=payload,
        )

    def _publish_table(self) -> None:
        with self._lock:
            rows = list(self._recent)[::-1]
            self._changed["table"] = False
        table = [_table_row(result) for result in rows]
        self._publish_artifact(
            "table",
            self.intervals.table_version_s,
            lambda description: create_table_artifact(
                table, key=self.keys["table"], description=description
            ),
            json.dumps(table),
            f"Scan {self.scan_id}: the newest {len(rows)} exposures",
        )

    def _publish_plot(self) -> None:
        with self._lock:
            index = np.frombuffer(self._index, dtype=np.int64).copy()
            quantiles = np.frombuffer(self._quantiles, dtype=np.float64).reshape(-1, 3, 3).copy()
            flagged = np.frombuffer(self._flagged, dtype=np.int8).astype(bool)
            self._changed["plot"] = False
        with self._reading:
            if self._abandoned:  # the writer may be closing the file
                return
            try:
                latest = latest_posterior(self.results_path)
            except (OSError, KeyError, ValueError) as error:  # not created yet, or replaced
                log.debug("no posterior to plot from %s yet: %s", self.results_path, error)
                latest = None
        png = live_view_png(index, quantiles, flagged, latest, title=f"Scan {self.scan_id}")
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        self._publish_artifact(
            "plot",
            self.intervals.plot_version_s,
            lambda description: create_image_artifact(
                url, key=self.keys["plot"], description=description
            ),
            url,
            f"Scan {self.scan_id}: posterior across the scan, newest posterior",
        )

    def _publish_artifact(
        self,
        kind: str,
        version_s: float,
        create: Callable[[str], object],
        data: str,
        description: str,
    ) -> None:
        """A new version of the artifact (``create``) when its newest is ``version_s`` old
        or there is none, else the newest updated in place with ``data``. A failed update
        makes the next one a new version (the newest may be gone)."""
        now = time.monotonic()
        newest = self._versions.pop(kind, None)
        if newest is not None and now - newest[1] < version_s:
            if self._call(kind, _update_artifact, newest[0], data, description) is not (
                _FAILED_CALL
            ):
                self._versions[kind] = newest
            return
        created = self._call(kind, create, description)
        if isinstance(created, UUID):
            self._versions[kind] = (created, now)
            self.published[f"{kind}_versions"] += 1

    @property
    def _resource(self) -> dict[str, str]:
        return {
            "prefect.resource.id": f"beamline-inn.scan.{self.scan_id}",
            "prefect.resource.name": self.scan_id,
        }

    def _scan_event(self, what: str) -> None:
        with self._lock:
            payload: dict[str, object] = {"submitted": self.expected or self._total}
            payload |= self._counts
        payload["results"] = str(self.results_path)
        self._call(
            "events",
            emit_event,
            event=EVENT_SCAN.format(what),
            resource=self._resource,
            related=self._related,
            payload=payload,
        )

    def _emit_events(self) -> None:
        with self._lock:
            flagged, self._new_flagged = self._new_flagged, []
            failed, self._new_failed = self._new_failed, []
            restarts, self._writer_restarts = self._writer_restarts, []
        resource = self._resource
        self._unlogged["failed"] += len(failed)
        self._unlogged["flagged"] += len(flagged)
        self._unlogged_failed += failed[: LOG_EXPOSURES - len(self._unlogged_failed)]
        self._unlogged_flagged += flagged[: LOG_EXPOSURES - len(self._unlogged_flagged)]
        if flagged:
            payload = {
                "count": len(flagged),
                "exposures": [index for index, _ in flagged[:EVENT_EXPOSURES]],
                "predictive_z": [round(z, 1) for _, z in flagged[:EVENT_EXPOSURES]],
                "results": str(self.results_path),
            }
            self._call(
                "events",
                emit_event,
                event=EVENT_FLAGGED,
                resource=resource,
                related=self._related,
                payload=payload,
            )
        for restarted in restarts:
            self._call(
                "events",
                emit_event,
                event=EVENT_WRITER_RESTARTED,
                resource=resource,
                related=self._related,
                payload={
                    "exit_code": restarted.code,
                    "restarts": restarted.restarts,
                    "max_restarts": restarted.max_restarts,
                    "resent": restarted.resent,
                    "results": str(self.results_path),
                    "message": restarted.describe(),
                },
            )
        if failed:
            payload = {
                "count": len(failed),
                "exposures": [index for index, _ in failed[:EVENT_EXPOSURES]],
                "errors": [error for _, error in failed[:EVENT_EXPOSURES]],
                "results": str(self.results_path),
            }
            self._call(
                "events",
                emit_event,
                event=EVENT_FAILED,
                resource=resource,
                related=self._related,
                payload=payload,
            )

    def _log_problems(self) -> None:
        """One line of the run's log on the exposures failed and flagged since the last."""
        if self._unlogged["failed"] or self._unlogged["flagged"]:
            self._run_log.warning(
                problems_line(
                    self._unlogged_failed,
                    self._unlogged["failed"],
                    self._unlogged_flagged,
                    self._unlogged["flagged"],
                )
            )
            self.published["log_lines"] += 1
        self._unlogged = {"failed": 0, "flagged": 0}
        self._unlogged_failed, self._unlogged_flagged = [], []

    def _forward_warnings(self, final: bool) -> None:
        """Send the queued warnings to the run's log, at most ``log_lines_per_window`` per
        ``log_window_s``; the ones left out are counted in one line when the window ends
        (or the scan does)."""
        now = time.monotonic()
        if now - self._window_started >= self.intervals.log_window_s:
            self._report_left_out()
            self._window_started, self._window_sent = now, 0
        records, overflowed = self._warnings.take()
        self._left_out += overflowed
        for level, text in records:
            if self._abandoned:
                return
            if self._window_sent < self.intervals.log_lines_per_window:
                self._run_log.log(level, text)
                self._window_sent += 1
                self.published["log_lines"] += 1
            else:
                self._left_out += 1
        if final:
            self._report_left_out()

    def _report_left_out(self) -> None:
        if self._left_out and not self._abandoned:
            self._run_log.warning(
                "%d more warnings of %s not in this log (at most %d per %.0f s; the process's "
                "own log has them)",
                self._left_out,
                "/".join(FORWARDED_LOGGERS),
                self.intervals.log_lines_per_window,
                self.intervals.log_window_s,
            )
            self.published["log_lines"] += 1
        self._left_out = 0

    def _summary_addendum(self, failed: bool) -> str:
        """The exposures flagged in this run, and for a scan that failed, its counts and
        failures so far (the summary of a scan that ran to its end has those)."""
        with self._lock:
            counts = dict(self._counts)
            flagged, failures = list(self._listed_flagged), list(self._listed_failed)
        lines = []
        if failed:
            lines += [
                "",
                f"Before it stopped: {counts['written']} exposures written, {counts['failed']} "
                f"failed, {counts['flagged']} flagged.",
            ]
            if failures:
                lines += ["", "## Failed exposures", ""]
                lines += [f"- {index}: {error}" for index, error in failures]
                lines += _more(counts["failed"] - len(failures))
        if flagged:
            lines += ["", "## Flagged exposures (not explained by a grating)", ""]
            lines += [f"- {index}: posterior-predictive z {z:.1f}" for index, z in flagged]
            lines += _more(counts["flagged"] - len(flagged))
        return "\n" + "\n".join(lines) if lines else ""

    def _call(self, kind: str, function: Callable, *args: object, **kwargs: object) -> object:
        """Call the Prefect API and return what it returns, or :data:`_FAILED_CALL`: a
        failure is logged and the scan goes on. Prefect's client retries a lost connection
        for about a minute (2, 4, ... 32 s), so a shorter outage shows as one slow update,
        which is logged when the API answers again."""
        started = time.monotonic()
        try:
            result = function(*args, **kwargs)
        except Exception as error:  # the API is down or refused: the results file has it all
            self._api_failures += 1
            if self._api_failures == 1 and not self._abandoned:
                log.warning("Prefect update (%s) failed, the scan goes on: %s", kind, error)
            return _FAILED_CALL
        took_s = time.monotonic() - started
        if self._api_failures:
            log.warning("Prefect API answers again after %d failed updates", self._api_failures)
            self._api_failures = 0
        elif took_s > SLOW_UPDATE_S:
            log.warning(
                "Prefect API answers again: an update (%s) took %.0f s (unreachable or slow "
                "meanwhile); the scan went on",
                kind,
                took_s,
            )
        if kind in self.published:
            self.published[kind] += 1
        return result


def _update_artifact(artifact_id: UUID, data: str | float, description: str) -> None:
    """Replace an artifact version's data and description in place (no new version), with
    the API's own PATCH: Prefect's ``update_artifact`` (and ``update_progress_artifact``)
    would also emit a ``prefect.artifact.updated`` event holding the whole data, which the
    server keeps for its event retention (7 days): about 200 kB per update of a plot."""
    update = ArtifactUpdate(data=data, description=description)
    get_client(sync_client=True).request(
        "PATCH",
        "/artifacts/{id}",
        path_params={"id": artifact_id},
        json=update.model_dump(mode="json", exclude_unset=True),
    )


def problems_line(
    failed: list[tuple[int, str]], n_failed: int, flagged: list[tuple[int, float]], n_flagged: int
) -> str:
    """One line of the run's log on ``n_failed`` and ``n_flagged`` exposures, the first of
    which are ``failed`` (index, error) and ``flagged`` (index, posterior-predictive z).

    >>> problems_line([(12, "frame f_12.cbf: truncated")], 3, [(4, 41.2)], 1)
    '3 exposures failed: 12 (frame f_12.cbf: truncated) and 2 more; 1 flagged (not explained by a grating): 4 (z 41)'
    """
    parts = []
    if n_failed:
        named = ", ".join(f"{index} ({error[:LOG_ERROR_CHARS]})" for index, error in failed)
        parts.append(f"{_exposures(n_failed)} failed: {named}{_and_more(n_failed - len(failed))}")
    if n_flagged:
        named = ", ".join(f"{index} (z {z:.0f})" for index, z in flagged)
        what = f"{n_flagged}" if n_failed else _exposures(n_flagged)
        parts.append(
            f"{what} flagged (not explained by a grating): {named}"
            f"{_and_more(n_flagged - len(flagged))}"
        )
    return "; ".join(parts)


def _exposures(count: int) -> str:
    return f"{count} exposure" + ("" if count == 1 else "s")


def _and_more(count: int) -> str:
    return f" and {count} more" if count > 0 else ""


def _more(count: int) -> list[str]:
    return [f"- and {count} more"] if count > 0 else []


def _table_row(result: RecentResult) -> dict[str, object]:
    row: dict[str, object] = {"exposure": result.index, "status": result.status}
    for name, column in zip(GRATING_PARAMETERS, _COLUMNS, strict=True):
        if result.status == "ok":
            q05, q50, q95 = (level[column] for level in result.quantiles)
            row[f"{name} median [5%, 95%]"] = f"{q50:.2f} [{q05:.2f}, {q95:.2f}]"
        else:
            row[f"{name} median [5%, 95%]"] = ""
    z = result.predictive_z
    row["predictive z"] = "" if np.isnan(z) else round(z, 1)
    row["flagged"] = "not a grating?" if result.flagged else ""
    row["latency ms"] = round(1e3 * result.latency_s, 1)
    row["error"] = result.error
    return row
