"""What the feeder tells whoever runs it: :class:`ScanError` when the scan cannot go on,
a :class:`RecentResult` per exposure the writer acknowledges (the newest
:data:`RECENT_RESULTS` are kept for live views), a :class:`WriterRestarted` event, and the
:class:`ScanSummary` at the end.

Example:
    >>> result = RecentResult(3, "failed", 0.02, error="the frame is saturated")
    >>> result.describe()
    '3: failed: the frame is saturated'
    >>> event = WriterRestarted(code=-9, restarts=1, resent=12, max_restarts=3)
    >>> event.describe().split("; ")[1]
    '12 exposures not acknowledged were sent again'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.physics import PARAMETER_NAMES
from pipeline.physics.quality import Z_THRESHOLD

#: How many of the newest results :attr:`Feeder.recent <workers.feeder.Feeder.recent>` keeps.
RECENT_RESULTS = 64


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
    resent: int
    worker_restarts: int
    #: exposures already in the file of a resumed scan, not sent again
    skipped: int
    #: workers on other nodes that took part
    remote_workers: int
    wall_s: float
    exposures_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    failures: dict[int, str] = field(default_factory=dict)
    #: per stage: count, p50/p99 latency (see :mod:`workers.feeder.metrics`)
    stages: dict[str, dict] = field(default_factory=dict)
    #: CPU time of the feeder's process (all its threads) over ``wall_s``
    feeder_cpu_s: float = 0.0
    #: rows of a resumed file processed again: failed ones retried, or of files changed since
    redone: int = 0
    #: rows of a resumed file whose frame's file is no longer among the scan's files (kept)
    removed: int = 0
    #: times the results writer exited during the scan and was started again on the file
    writer_restarts: int = 0
    #: the source gave all it had and the results file is marked complete (set by the flow
    #: that ran the scan)
    complete: bool = False
    #: what the source gave, in one line (:meth:`~pipeline.sources.base.SourceStatistics.summary`)
    source: str = ""
    #: exposures written with a quality flag (posterior-predictive check failed)
    flagged: int = 0
    #: SIGTERM (Prefect cancelling the run, ``systemctl stop``) stopped the source; every
    #: frame taken was written (set by the flow that ran the scan)
    cancelled: bool = False

    @property
    def failed_fraction(self) -> float:
        """Failed exposures over those submitted (0 when none was)."""
        return self.failed / self.submitted if self.submitted else 0.0

    def counts(self) -> str:
        """The scan's exposures in one line, for a state message or a log.

        >>> ScanSummary("s", "s.h5", 13, 10, 3, 0, 0, 0, 0, 0, 1.0, 13.0, 40.0, 90.0,
        ...             flagged=2).counts()
        '13 exposures: 10 written, 3 failed, 2 flagged'
        """
        line = (
            f"{self.submitted} exposures: {self.written_ok} written, {self.failed} failed, "
            f"{self.flagged} flagged"
        )
        if self.skipped:
            line += f" ({self.skipped} already in the file)"
        return line


@dataclass(frozen=True)
class WriterRestarted:
    """The results writer exited during a scan (``code``: its exit code, negative for a
    signal) and was started again on the file; ``resent`` exposures not acknowledged were
    sent again. ``restarts`` of at most ``max_restarts`` so far."""

    code: int | None
    restarts: int
    resent: int
    max_restarts: int

    def describe(self) -> str:
        """One line for a log or an event."""
        return (
            f"the results writer exited with code {self.code} and was started again on the "
            f"file ({self.restarts} of at most {self.max_restarts}); {self.resent} exposures "
            "not acknowledged were sent again"
        )


@dataclass(frozen=True)
class RecentResult:
    """One exposure as the writer acknowledged it, for live views: status, the time from
    hand-over to written, and (when ``ok``) posterior mean, sd and 5/50/95% quantiles per
    parameter (``PARAMETER_NAMES`` order)."""

    index: int
    status: str
    latency_s: float
    mean: tuple[float, ...] = ()
    sd: tuple[float, ...] = ()
    quantiles: tuple[tuple[float, ...], ...] = ()
    error: str = ""
    #: the posterior-predictive check (:mod:`pipeline.physics.quality`)
    predictive_z: float = float("nan")

    @property
    def flagged(self) -> bool:
        """The grating model cannot explain this line-out."""
        return self.predictive_z > Z_THRESHOLD

    def describe(self) -> str:
        """One line, e.g. ``12: pitch_nm 100.2 [99.8, 100.6], ...`` (median [5%, 95%])."""
        if self.status != "ok":
            return f"{self.index}: {self.status}: {self.error}"
        parts = [
            f"{name} {q50:.4g} [{q05:.4g}, {q95:.4g}]"
            for name, q05, q50, q95 in zip(PARAMETER_NAMES, *self.quantiles, strict=True)
        ]
        line = f"{self.index}: " + ", ".join(parts)
        if self.flagged:
            line += f" FLAGGED (z = {self.predictive_z:.0f}): not explained by a grating"
        return line
