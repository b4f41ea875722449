"""Per-stage counters and latency histograms of a scan: what the feeder sees happen.

Stages, in the order an exposure passes them: ``received`` (handed to the feeder; for a live
source's frame, with the wait since the detector acquired it, by the detector's own time,
or since the pipeline took it from the socket where that is earlier),
``integrated`` (frame to line-out, with the integration time), ``inferred`` (posterior drawn
by a worker, with its batch's inference time), ``written`` (acknowledged by the writer, with
the time since it was received, or acquired for a live source's frame), and the two ways
off the path, ``resent`` (taken from a lost
worker and sent again) and ``failed`` (written as a failed exposure). Latencies go into a
fixed log-spaced histogram (4 bins per decade, 0.1 ms to 100 s), so memory does not grow with
the scan and histograms from several runs add up.

Example:
    >>> metrics = ScanMetrics()
    >>> metrics.record("integrated", 0.0042)
    >>> metrics.record("integrated", 0.0051)
    >>> metrics.stages["integrated"].count, metrics.stages["integrated"].quantile_ms(0.5) < 6.0
    (2, True)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

#: Upper edges (ms) of the latency bins: 4 per decade from 0.1 ms to 100 s; one more bin
#: holds everything slower.
LATENCY_EDGES_MS: tuple[float, ...] = tuple(10.0 ** (k / 4) for k in range(-4, 21))
#: The stages counted, in path order.
STAGES = ("received", "integrated", "inferred", "written", "resent", "failed")


@dataclass
class StageMetrics:
    """How many exposures passed a stage, and a histogram of their latencies."""

    count: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))

    def record(self, latency_s: float | None = None, n: int = 1) -> None:
        """Count ``n`` exposures, each with ``latency_s`` when the stage has a latency."""
        self.count += n
        if latency_s is not None:
            self.histogram[bisect.bisect_left(LATENCY_EDGES_MS, 1e3 * latency_s)] += n

    def quantile_ms(self, q: float) -> float:
        """Upper edge (ms) of the bin holding quantile ``q`` of the latencies; NaN if none
        (and infinity for the overflow bin)."""
        total = sum(self.histogram)
        if total == 0:
            return float("nan")
        seen = 0
        for edge, n in zip((*LATENCY_EDGES_MS, float("inf")), self.histogram, strict=True):
            seen += n
            if seen >= q * total:
                return edge
        return float("inf")


@dataclass
class ScanMetrics:
    """:class:`StageMetrics` for every stage of :data:`STAGES`."""

    stages: dict[str, StageMetrics] = field(
        default_factory=lambda: {stage: StageMetrics() for stage in STAGES}
    )

    def record(self, stage: str, latency_s: float | None = None, n: int = 1) -> None:
        """Count ``n`` exposures through ``stage``, each with ``latency_s`` where it has one."""
        self.stages[stage].record(latency_s, n)

    def summary(self) -> dict[str, dict]:
        """Per stage: count, and p50 / p99 latency (ms, bin upper edges) where measured."""
        out = {}
        for name, stage in self.stages.items():
            entry: dict = {"count": stage.count}
            if sum(stage.histogram):
                entry.update(p50_ms=stage.quantile_ms(0.5), p99_ms=stage.quantile_ms(0.99))
            out[name] = entry
        return out

    def table(self) -> str:
        """The summary as aligned text lines (for logs and command output)."""
        return stage_table(self.summary())


def stage_table(stages: dict[str, dict]) -> str:
    """:meth:`ScanMetrics.summary` output as aligned text lines, one per stage."""
    lines = []
    for name, entry in stages.items():
        line = f"{name:<11}{entry['count']:>8}"
        if "p50_ms" in entry:
            line += f"   p50 <= {entry['p50_ms']:.3g} ms, p99 <= {entry['p99_ms']:.3g} ms"
        lines.append(line)
    return "\n".join(lines)
