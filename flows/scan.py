"""The ``reconstruct-scan`` flow: one simulated scan end to end, watched from Prefect.

The flow is thin: :class:`workers.scan.ScanRunner` starts the writer and inference workers,
each task integrates and sends one batch of frames (never one task per exposure: a Prefect
task costs 10-27 ms here), and progress is reported through one progress artifact updated at
most once a second, plus a markdown summary at the end.

Without ``PREFECT_API_URL`` the flow runs on Prefect's ephemeral local server.
"""

from __future__ import annotations

import dataclasses
import time
from itertools import islice
from pathlib import Path

import numpy as np
from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from pipeline.config import InferenceConfig, PipelineConfig
from pipeline.exposure import Exposure
from pipeline.sources import SimulatedDetector
from pipeline.store import read_results
from workers.scan import ScanRunner, ScanSummary


@task(name="integrate-and-send", cache_policy=NO_CACHE)
def submit_batch(runner: ScanRunner, exposures: list[Exposure]) -> int:
    """Integrate a batch of frames and send the line-outs to the workers."""
    for exposure in exposures:
        runner.submit(exposure)
    return runner.collect()


@task(name="wait-for-results", cache_policy=NO_CACHE)
def wait_for_results(runner: ScanRunner, progress: RateLimitedProgress) -> ScanSummary:
    """Wait until the writer has acknowledged every exposure."""
    return runner.wait(on_progress=lambda done, total: progress.update(done, total))


class RateLimitedProgress:
    """A Prefect progress artifact updated at most once per ``interval_s`` (plus at the end)."""

    def __init__(self, scan_id: str, interval_s: float = 1.0) -> None:
        self.artifact_id = create_progress_artifact(
            0.0, key="scan-progress", description=f"Scan {scan_id}"
        )
        self.interval_s = interval_s
        self._last = 0.0

    def update(self, done: int, total: int, force: bool = False) -> None:
        if force or time.monotonic() - self._last >= self.interval_s:
            update_progress_artifact(self.artifact_id, 100.0 * done / max(total, 1))
            self._last = time.monotonic()


def _summary_markdown(summary: ScanSummary) -> str:
    lines = [
        f"# Scan `{summary.scan_id}`",
        "",
        "| exposures | written | failed | wall time | rate | latency p50 / p99 |",
        "|---|---|---|---|---|---|",
        f"| {summary.submitted} | {summary.written_ok} | {summary.failed} | {summary.wall_s:.1f} s "
        f"| {summary.exposures_per_s:.1f} /s | {summary.latency_p50_ms:.0f} / "
        f"{summary.latency_p99_ms:.0f} ms |",
        "",
        f"Results: `{summary.output_path}`",
    ]
    if summary.failures:
        lines += ["", "## Failed exposures", ""]
        lines += [f"- {index}: {error}" for index, error in sorted(summary.failures.items())]
    return "\n".join(lines)


@flow(name="reconstruct-scan")
def reconstruct_simulated_scan(
    n_frames: int = 64,
    n_workers: int = 2,
    output_dir: Path = Path("beamline-inn-results"),
    seed: int = 0,
    scan_id: str | None = None,
    n_samples: int = 1000,
    batch_size: int = 16,
    model: Path | None = None,
) -> dict:
    """Simulate ``n_frames`` exposures and reconstruct them into ``OUTPUT_DIR/SCAN_ID.h5``."""
    scan_id = scan_id or time.strftime("sim-%Y%m%d-%H%M%S")
    config = PipelineConfig(
        scan_id=scan_id,
        output_dir=output_dir,
        n_workers=n_workers,
        inference=InferenceConfig(n_samples=n_samples, model=model),
    )
    source = SimulatedDetector(config.integration, config.grid.grid(), seed=seed).exposures(
        scan_id, n_frames
    )
    progress = RateLimitedProgress(scan_id)
    with ScanRunner(config) as runner:
        while batch := list(islice(source, batch_size)):
            submit_batch(runner, batch)
            progress.update(runner.n_done, n_frames)
        summary = wait_for_results(runner, progress)
    progress.update(summary.submitted, summary.submitted, force=True)
    create_markdown_artifact(_summary_markdown(summary), key="scan-summary", description=scan_id)
    return dataclasses.asdict(summary)


def posterior_vs_truth(path: Path, n_rows: int = 5) -> str:
    """A small table of posterior medians [5%, 95%] against the true values."""
    results = read_results(path)
    names = ("pitch_nm", "width_nm", "sigma_nm")
    columns = [results.parameter_names.index(name) for name in names]
    lines = ["exposure  " + "  ".join(f"{name:>34}" for name in names)]
    for row in np.flatnonzero(results.status == "ok")[:n_rows]:
        cells = []
        for name, column in zip(names, columns, strict=True):
            low, median, high = results.quantiles[row, :, column]
            truth = results.truth[row, column]
            mirror = ""
            if name == "width_nm":  # w and p - w are equally likely: show both
                mirror = f"|{results.truth[row, 0] - truth:.1f}"
            cells.append(f"{median:7.2f} [{low:7.2f},{high:7.2f}] true {truth:.1f}{mirror}")
        lines.append(f"{results.index[row]:>8}  " + "  ".join(f"{c:>34}" for c in cells))
    return "\n".join(lines)


def run_demo(n_frames: int, n_workers: int, output_dir: Path, seed: int, model: Path | None) -> int:
    """``beamline-inn demo``: run the flow, then print where the results are and a summary."""
    summary = reconstruct_simulated_scan(
        n_frames=n_frames, n_workers=n_workers, output_dir=output_dir, seed=seed, model=model
    )
    print()
    print(f"results:    {summary['output_path']}")
    print(
        f"exposures:  {summary['submitted']} ({summary['written_ok']} written, {summary['failed']} failed)"
    )
    print(
        f"scan time:  {summary['wall_s']:.1f} s from first frame to last write "
        f"({summary['exposures_per_s']:.1f} exposures/s)"
    )
    print(
        f"latency:    p50 {summary['latency_p50_ms']:.0f} ms, p99 {summary['latency_p99_ms']:.0f} ms"
    )
    print("posterior median [5%, 95%] against the truth (width: w|p-w, both are solutions):")
    print(posterior_vs_truth(Path(summary["output_path"])))
    return 0 if summary["failed"] == 0 else 1
