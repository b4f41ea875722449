"""Per-stage counters and latency histograms."""

import math

from workers.feeder.metrics import LATENCY_EDGES_MS, STAGES, ScanMetrics, StageMetrics, stage_table


def test_quantiles_are_the_upper_edges_of_the_bins_that_hold_them():
    stage = StageMetrics()
    assert math.isnan(stage.quantile_ms(0.5))
    for latency_ms in [1.0] * 98 + [900.0, 900.0]:
        stage.record(latency_ms / 1e3)
    assert stage.count == 100
    assert stage.quantile_ms(0.5) == 1.0  # 1 ms lies on an edge: its own bin
    assert 900.0 <= stage.quantile_ms(0.99) < 900.0 * 10**0.25
    stage.record(1e6)  # 1000 s: beyond the last edge
    assert stage.quantile_ms(1.0) == math.inf and len(stage.histogram) == len(LATENCY_EDGES_MS) + 1


def test_counts_without_latency_and_batches_of_several():
    metrics = ScanMetrics()
    metrics.record("resent", n=3)
    metrics.record("inferred", 0.05, n=8)
    summary = metrics.summary()
    assert list(summary) == list(STAGES)
    assert summary["resent"] == {"count": 3}
    assert summary["inferred"]["count"] == 8 and summary["inferred"]["p50_ms"] >= 50.0
    assert "resent" in stage_table(summary) and "p50 <=" in metrics.table()
