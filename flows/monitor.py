"""Watching a scan in the Prefect UI: progress, recent exposures, traces, events, a summary.

:class:`ScanMonitor` is fed by the feeder, which calls :meth:`ScanMonitor.record` for each
exposure the writer acknowledges (bookkeeping under a lock: microseconds) and
:meth:`ScanMonitor.update` with the counts whenever it likes. A thread of its own publishes
to Prefect, each kind of artifact at most once per its interval, so the feeder never waits
for the API, and a scan of any length makes a bounded number of API calls:

- ``scan-progress``: a progress artifact (every ``progress_s``, default 1 s);
- ``recent-exposures``: a table artifact of the newest exposures: posterior median and 90%
  interval of pitch, width and sigma, the quality flag (posterior-predictive z), the latency
  from hand-over to written, the error of a failed one (every ``table_s``, 5 s);
- ``scan-plots``: an image artifact (a PNG as a ``data:`` URL): the traces across the scan
  and the newest exposure's posterior marginals, read from the results file as it is written
  (every ``plot_s``, 15 s);
- events ``beamline-inn.exposures.flagged`` and ``beamline-inn.exposures.failed`` (at most one
  of each per ``events_s``, 5 s, with the count and the exposures), and
  ``beamline-inn.writer.restarted`` (one per restart of the results writer, with its exit
  code and the exposures sent again), on the resource ``beamline-inn.scan.<scan id>`` and
  related to the flow run, for automations to alert on;
- events ``beamline-inn.scan.started``, and ``beamline-inn.scan.finished`` or
  ``beamline-inn.scan.failed`` when it ends, with the counts (submitted, written, failed,
  flagged) in their payload;
- ``scan-summary``: a markdown artifact when the scan ends (:meth:`ScanMonitor.finish`).

The progress is of the exposures written without failure, so a scan with failed exposures
never shows 100%.

A Prefect API that cannot be reached does not stop the scan: the failed update is logged,
the next one is tried at its time, and the log says when the API answers again.
"""

from __future__ import annotations

import base64
import contextvars
import logging
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
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
#: A scan's start and end: ``beamline-inn.scan.started``, ``.finished`` (it ran to its end,
#: whatever its exposures' outcome) or ``.failed`` (it stopped on an error), with the counts.
EVENT_SCAN = "beamline-inn.scan.{}"
#: Rows of the recent-exposures table.
TABLE_ROWS = 20
#: Exposures listed by name in one event (the count covers them all).
EVENT_EXPOSURES = 100
_COLUMNS = [PARAMETER_NAMES.index(name) for name in GRATING_PARAMETERS]


@dataclass(frozen=True)
class MonitorIntervals:
    """Least time between two updates of each kind, in seconds."""

    progress_s: float = 1.0
    table_s: float = 5.0
    plot_s: float = 15.0
    events_s: float = 5.0


class ScanMonitor:
    """Publishes a scan's progress, recent exposures, plots and alerts to Prefect (see the
    module docstring); create it inside a flow run, whose context its thread keeps.

    Args:
        scan_id: the scan, named in descriptions and in the events' resource.
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
        self._lock = threading.Lock()
        self._recent: deque[RecentResult] = deque(maxlen=TABLE_ROWS)
        self._index = array("q")  # exposures with a posterior, in acknowledgement order
        self._quantiles = array("d")  # 9 per exposure: (5/50/95%) x (pitch, width, sigma)
        self._flagged = array("b")
        self._new_flagged: list[tuple[int, float]] = []
        self._new_failed: list[tuple[int, str]] = []
        self._writer_restarts: list[WriterRestarted] = []
        self._total = 0
        self._counts = {"written": 0, "failed": 0, "flagged": 0}  # acknowledged so far
        self._changed = {"table": False, "plot": False}
        self._last = {"progress": 0.0, "table": 0.0, "plot": 0.0, "events": 0.0}
        self._api_failures = 0
        #: updates published, by kind (for tests and the benchmark)
        self.published = {"progress": 0, "table": 0, "plot": 0, "events": 0}
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
        self._progress_id = None
        try:
            self._progress_id = create_progress_artifact(
                0.0, key="scan-progress", description=f"Scan {scan_id}: exposures written"
            )
        except Exception as error:  # the API is down: the scan starts all the same
            self._api_failures = 1
            log.warning("Prefect progress artifact not created, the scan goes on: %s", error)
        self._scan_event("started")
        context = contextvars.copy_context()  # the flow run's, so artifacts attach to it
        self._thread = threading.Thread(
            target=context.run, args=(self._publish_loop,), name="prefect-monitor", daemon=True
        )
        self._thread.start()

    # -- the feeder's side: bookkeeping only -------------------------------------------------
    def record(self, result: RecentResult) -> None:
        """Take one acknowledged exposure (called by the feeder, once per exposure)."""
        with self._lock:
            self._recent.append(result)
            self._changed["table"] = True
            if result.status != "ok":
                self._counts["failed"] += 1
                self._new_failed.append((result.index, result.error))
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

    def writer_restarted(self, restarted: WriterRestarted) -> None:
        """Take a restart of the results writer (called by the feeder): an event soon."""
        with self._lock:
            self._writer_restarts.append(restarted)
        self._last["events"] = 0.0  # published with the next round, not after events_s

    def update(self, done: int, total: int) -> None:
        """The exposures acknowledged (written or failed) and submitted so far, as the
        feeder reports progress (:meth:`~workers.feeder.Feeder.wait`); the progress shown
        counts those written without failure, from :meth:`record`, over ``total``."""
        self._total = total

    def finish(self, summary_markdown: str, failed: bool = False, timeout_s: float = 30.0) -> None:
        """Publish everything a last time, then the summary (markdown) and the scan's
        ``finished`` event (``failed``: the ``failed`` event); stop the thread. Call it also
        when the scan failed, with what is known, or the thread goes on."""
        self._stop.set()
        self._thread.join(timeout_s)
        self._scan_event("failed" if failed else "finished")
        self._call(
            "summary",
            create_markdown_artifact,
            summary_markdown,
            key="scan-summary",
            description=f"Scan {self.scan_id}: summary",
        )

    def abandon(self) -> None:
        """Stop publishing, without a last update or a summary (Ctrl-C: the run ends, and its
        API client closes): no update starts any more, and one under way that fails is not
        logged. Returns once no plot reads the results file (a read takes milliseconds), so
        that the writer can close it; :meth:`join` waits for the rest of that update."""
        self._abandoned = True
        self._stop.set()
        with self._reading:
            pass

    def join(self, timeout_s: float = 3.0) -> None:
        """Wait up to ``timeout_s`` for the publishing thread to end once :meth:`abandon`
        stopped it (a thread still drawing when the process ends can crash it)."""
        self._thread.join(timeout_s)

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
            total = self.expected or self._total
            percent = 100.0 * self._counts["written"] / max(total, 1)
            self._call("progress", update_progress_artifact, self._progress_id, percent)
        if self._due("events", self.intervals.events_s, final):
            self._emit_events()
        if self._changed["table"] and self._due("table", self.intervals.table_s, final):
            self._publish_table()
        if self._changed["plot"] and self._due("plot", self.intervals.plot_s, final):
            self._publish_plot()

    def _publish_table(self) -> None:
        with self._lock:
            rows = list(self._recent)[::-1]
            self._changed["table"] = False
        table = [_table_row(result) for result in rows]
        self._call(
            "table",
            create_table_artifact,
            table,
            key="recent-exposures",
            description=f"Scan {self.scan_id}: the newest {len(rows)} exposures",
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
        self._call(
            "plot",
            create_image_artifact,
            url,
            key="scan-plots",
            description=f"Scan {self.scan_id}: posterior across the scan, newest posterior",
        )

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

    def _call(self, kind: str, function: Callable, *args: object, **kwargs: object) -> None:
        """Call the Prefect API; a failure is logged and the scan goes on. Prefect's client
        retries a lost connection for about a minute (2, 4, ... 32 s), so a shorter outage
        shows as one slow update, which is logged when the API answers again."""
        started = time.monotonic()
        try:
            function(*args, **kwargs)
        except Exception as error:  # the API is down or refused: the results file has it all
            self._api_failures += 1
            if self._api_failures == 1 and not self._abandoned:
                log.warning("Prefect update (%s) failed, the scan goes on: %s", kind, error)
            return
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
