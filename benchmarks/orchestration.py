"""What Prefect costs per exposure (issue: orchestration), side by side in one run.

The same simulated scan (Eiger 4M frames, sector integration, 1,000 posterior samples per
exposure, 2 inference workers, HDF5 write) three ways, alternating, ``--repeats`` times:

1. **plain**: a :class:`Feeder` fed in batches of 16 frames from this process, no Prefect;
2. **flow**: the ``reconstruct-scan`` flow (what ``beamline-inn demo`` runs): the same batches
   as Prefect tasks, with the :class:`~flows.monitor.ScanMonitor` publishing progress, the
   recent-exposures table, the plots and events, and the summary artifact, and the scan's
   live page served (:mod:`pipeline.live`), nobody looking;
3. **watched**: the flow while someone looks at its live page: its state and its figure
   fetched every second from this process, as the page's script does (:func:`watched`).

Both are timed from the first frame to the last exposure written (``ScanSummary.wall_s``;
process start-up and Prefect's server start left out), and the CPU time of this process
(the feeder, and in the flow also the monitor's thread and Prefect's client) over the same
interval (``ScanSummary.feeder_cpu_s``). Prefect's overhead per exposure is the difference divided by the exposures.
The Prefect API calls are counted too: task runs and artifact updates grow with the scan's
length and batches, not with its exposures one by one.

Then **what a long scan stores** in Prefect's database (:func:`budget_hour`): an hour of an
online scan at ``--rate`` exposures/s, run ``--factor`` times faster (the monitor's
intervals divided by it, :meth:`~flows.monitor.MonitorIntervals.scaled`): synthetic
acknowledged exposures (0.1% failed, 1% flagged) through a :class:`~flows.monitor.ScanMonitor`
in a flow, the detector silent for five minutes halfway, warnings of the library's loggers
(one every 5 minutes, and a burst of 30). Measured in the server's SQLite file: the stored
bytes per artifact version, run-log line and event (the rows' data, description, message,
payload), and the growth of the file's used pages over the hour (rows, indexes, the churn
of updates in place); extrapolated to a 12-hour scan and set against :data:`BUDGET_MB`.

Run: ``python -m benchmarks.orchestration [--exposures 300] [--repeats 3] [--factor 60]
[--rate 25]`` (results in ``benchmarks/results/orchestration.json``; ``--budget-only``: only
the long scan's storage, replacing that part of the results and keeping the rest). Without
``PREFECT_API_URL`` the flows run on Prefect's ephemeral server, started once before the
first run, with its database in a temporary ``PREFECT_HOME``; against an API of one's own
the stored bytes are not measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import sqlite3
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.report import save
from pipeline.config import InferenceConfig, PipelineConfig
from pipeline.sources import SimulatedDetector
from workers.feeder import Feeder, RecentResult

if TYPE_CHECKING:  # imported where used: Prefect reads PREFECT_HOME when first imported
    from flows.monitor import MonitorIntervals

RESULTS = Path(__file__).parent / "results" / "orchestration.json"
BATCH = 16
#: What a 12-hour scan may store in Prefect's database: its artifact versions and its run's
#: log lines (events are left out: Prefect deletes them after its retention period, 7 days).
BUDGET_MB = 5.0
SCAN_HOURS = 12.0
FAILED_FRACTION = 0.001
FLAGGED_FRACTION = 0.01


def plain(n: int, out: Path, scan_id: str) -> dict:
    """The scan through a Feeder, no Prefect."""
    config = PipelineConfig(scan_id=scan_id, output_dir=out, n_workers=2)
    source = SimulatedDetector(config.integration, seed=0).scan(scan_id, n).exposures()
    with Feeder(config) as feeder:
        while batch := list(islice(source, BATCH)):
            for exposure in batch:
                feeder.submit(exposure)
            feeder.collect()
        summary = feeder.wait()
    return {"wall_s": summary.wall_s, "cpu_s": summary.feeder_cpu_s, "written": summary.written_ok}


def flow(n: int, out: Path, scan_id: str) -> dict:
    """The scan through the ``reconstruct-scan`` flow."""
    from flows.scan import reconstruct_simulated_scan

    state = reconstruct_simulated_scan(
        n_frames=n,
        n_workers=2,
        output_dir=out,
        scan_id=scan_id,
        batch_size=BATCH,
        return_state=True,
    )
    summary = state.result()
    return {
        "wall_s": summary.wall_s,
        "cpu_s": summary.feeder_cpu_s,
        "written": summary.written_ok,
        "flow_run_id": str(state.state_details.flow_run_id),
    }


def watched(n: int, out: Path, scan_id: str) -> dict:
    """The scan through the ``reconstruct-scan`` flow while its live page is looked at: its
    ``api/state`` and ``figure.png`` fetched every second (the page draws the figure when
    the scan shows something new, at most once per second)."""
    import socket
    import threading
    import urllib.request

    from pipeline.live.server import ENV_ADDRESS

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    stop, looks = threading.Event(), {"state": 0, "figure": 0}

    def look() -> None:
        while not stop.wait(1.0):
            for what, path in (("state", "api/state"), ("figure", "figure.png")):
                try:
                    with urllib.request.urlopen(url + path, timeout=10) as response:
                        response.read()
                    looks[what] += 1
                except OSError:  # not served yet, or no more
                    break

    os.environ[ENV_ADDRESS] = f"127.0.0.1:{port}"
    looker = threading.Thread(target=look, daemon=True)
    looker.start()
    try:
        result = flow(n, out, scan_id)
    finally:
        stop.set()
        looker.join()
        del os.environ[ENV_ADDRESS]
    return result | {"looks": looks}


def count_api_objects(flow_run_id: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    kinds: dict[str, int] = {}
    for artifact in artifacts:
        kinds[artifact.key] = kinds.get(artifact.key, 0) + 1
    return {"task_runs": len(task_runs), "artifacts_by_key": kinds}


def _database() -> Path | None:
    """The SQLite file of the Prefect server this process uses (its ephemeral one), or
    ``None`` for an API elsewhere or another database."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return None
    url = settings.server.database.connection_url
    text = url.get_secret_value() if url is not None else ""
    prefix = "sqlite+aiosqlite:///"
    return Path(text.removeprefix(prefix)) if text.startswith(prefix) else None


def _used_bytes(database: Path) -> int:
    """The bytes of the database's pages in use (its size less its free pages)."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        (page_size,), (pages,), (free,) = (
            connection.execute(f"PRAGMA {name}").fetchone()
            for name in ("page_size", "page_count", "freelist_count")
        )
    return int(page_size * (pages - free))


def _stored(database: Path, flow_run_id: str, scan_id: str) -> dict:
    """The run's rows: artifact versions by key, log lines and the scan's events, with the
    bytes of their content (data, description, message, payload and the like)."""
    run = flow_run_id.replace("-", "")  # SQLite stores the UUIDs as 32 hex digits
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        artifacts = {
            key: {"versions": versions, "bytes": size}
            for key, versions, size in connection.execute(
                "SELECT key, count(*), sum(length(data) + length(coalesce(description, ''))) "
                "FROM artifact WHERE replace(flow_run_id, '-', '') = ? GROUP BY key",
                (run,),
            )
        }
        logs = connection.execute(
            "SELECT count(*), coalesce(sum(length(message) + length(name)), 0) FROM log "
            "WHERE replace(flow_run_id, '-', '') = ?",
            (run,),
        ).fetchone()
        events = {
            event: {"count": count, "bytes": size}
            for event, count, size in connection.execute(
                "SELECT event, count(*), sum(length(payload) + length(resource) + length(related)"
                " + length(event)) FROM events WHERE resource_id = ? GROUP BY event",
                (f"beamline-inn.scan.{scan_id}",),
            )
        }
    return {
        "artifacts": artifacts,
        "log_lines": {"count": logs[0], "bytes": logs[1]},
        "events": {
            "count": sum(v["count"] for v in events.values()),
            "bytes": sum(v["bytes"] for v in events.values()),
            "by_event": events,
        },
    }


def _synthetic(index: int, rng: np.random.Generator) -> RecentResult:
    """An acknowledged exposure of a slowly drifting grating; some failed, some flagged."""
    draw = rng.random()
    if draw < FAILED_FRACTION:
        return RecentResult(index, "failed", 0.3, error=f"frame f_{index}.cbf: truncated file")
    pitch = 100.0 + 5.0 * math.sin(index / 5000.0) + rng.normal(0.0, 0.3)
    width, sigma = 40.0 + rng.normal(0.0, 0.5), 3.0 + rng.normal(0.0, 0.05)
    median = (pitch, width, sigma, 1e4, 1.0)
    quantiles = tuple(tuple(v * (1.0 + f) for v in median) for f in (-0.02, 0.0, 0.02))
    z = 60.0 if draw < FAILED_FRACTION + FLAGGED_FRACTION else float(rng.normal(1.0, 1.0))
    return RecentResult(index, "ok", 0.3, quantiles=quantiles, predictive_z=z)


def budget_hour(factor: float, rate_per_s: float, out: Path) -> dict:
    """An hour of an online scan at ``rate_per_s``, run ``factor`` times faster (see the
    module docstring): what it publishes, what it stores, and that extrapolated to
    :data:`SCAN_HOURS` against :data:`BUDGET_MB`."""
    from prefect import flow as prefect_flow
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    from flows.monitor import MonitorIntervals, ScanMonitor
    from pipeline.physics import PARAMETER_NAMES
    from pipeline.store import ExposureResult, ResultsWriter

    database = _database()
    if database is None:
        return {"measured": False, "why": "the Prefect API is not this process's own SQLite"}
    intervals = MonitorIntervals().scaled(factor)
    hour_s, silent_s = 3600.0 / factor, 300.0 / factor  # the run, the detector's pause
    scan_id = f"budget-{int(time.time())}"
    library = logging.getLogger("pipeline.sources.benchmark")

    @prefect_flow(name="artifact-budget")
    def simulated_online_hour() -> tuple[dict, str]:
        rng = np.random.default_rng(0)
        path = out / f"{scan_id}.h5"
        samples = rng.normal((100.0, 40.0, 3.0, 1e4, 1.0), (1.0, 0.5, 0.05, 100, 0.01), (1000, 5))
        units = ("nm",) * 3 + ("", "")
        q_nm = np.linspace(0.01, 0.4, 512)
        with ResultsWriter(path, PARAMETER_NAMES, units, 1000, q_nm, scan_id=scan_id) as writer:
            writer.append(ExposureResult(0, 0.0, samples=samples.astype(np.float32)))
            writer.file.flush()
            monitor = ScanMonitor(scan_id, path, intervals=intervals)
            started, index, warned = time.monotonic(), 0, 0
            while (elapsed_s := time.monotonic() - started) < hour_s:
                paused = hour_s / 2 <= elapsed_s < hour_s / 2 + silent_s
                feeding_s = elapsed_s - min(max(elapsed_s - hour_s / 2, 0.0), silent_s)
                while not paused and index < rate_per_s * factor * feeding_s:
                    monitor.record(_synthetic(index, rng))
                    index += 1
                monitor.update(index, index)
                while warned < elapsed_s * factor / 300:  # one warning every 5 minutes
                    library.warning("frame %d arrived %.1f s late", index, 2.5)
                    warned += 1
                if warned == 3:  # and once a burst
                    for number in range(30):
                        library.warning("reader retried frame %d", index + number)
                    warned += 1
                time.sleep(0.01)
            monitor.finish(f"# Scan `{scan_id}`\n\n{index} synthetic exposures")
        return monitor.published | {"exposures": index}, str(flow_run.id)

    with get_client(sync_client=True) as client:  # the server up, its database created
        client.hello()
    before = _used_bytes(database)
    published, run_id = simulated_online_hour()
    deadline = time.monotonic() + 60  # events and log lines reach the database in batches
    stored, previous = _stored(database, run_id, scan_id), None
    while (stored != previous or not stored["events"]["count"]) and time.monotonic() < deadline:
        time.sleep(3)
        stored, previous = _stored(database, run_id, scan_id), stored
    grown = _used_bytes(database) - before
    return {
        "measured": True,
        "measured_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "factor": factor,
        "rate_per_s": rate_per_s,
        "intervals": dataclasses.asdict(MonitorIntervals()),
        "published": published,
        "stored": stored,
        "database_growth_bytes": grown,
        "extrapolated": _extrapolate(stored, MonitorIntervals()),
    }


def _extrapolate(stored: dict, intervals: MonitorIntervals) -> dict:
    """What a :data:`SCAN_HOURS` scan stores at most, from the bytes measured per row: the
    table and the plot, one version per their version interval (and the first); progress
    and summary as they are; the run's log lines, every interval full to its limit (a
    problems line naming the most exposures with the longest errors, warnings of the
    longest kept); the scan's events, every ``events_s`` one of each kind, and the event
    the server makes of each new version (its data, once more)."""
    from flows.monitor import LOG_ERROR_CHARS, LOG_EXPOSURES, WARNING_CHARS, problems_line

    seconds = SCAN_HOURS * 3600.0
    kinds = {"table": "recent-exposures-", "plot": "scan-plots-"}
    per_kind: dict[str, dict] = {}
    for kind, prefix in kinds.items():
        (row,) = [v for key, v in stored["artifacts"].items() if key.startswith(prefix)]
        versions = 1 + math.floor(seconds / getattr(intervals, f"{kind}_version_s"))
        per_version = row["bytes"] / row["versions"]
        per_kind[kind] = {"bytes_per_version": per_version, "versions": versions}
        per_kind[kind]["bytes"] = versions * per_version
    others = sum(
        v["bytes"]
        for key, v in stored["artifacts"].items()
        if not key.startswith(tuple(kinds.values()))
    )
    artifacts = sum(v["bytes"] for v in per_kind.values()) + others
    longest = problems_line(
        [(10**9, "e" * LOG_ERROR_CHARS)] * LOG_EXPOSURES,
        10**6,
        [(10**9, 1e5)] * LOG_EXPOSURES,
        10**6,
    )
    name = len("prefect.flow_runs")  # each line's logger, stored beside it
    problem_lines = seconds / intervals.log_problems_s
    windows = seconds / intervals.log_window_s
    warning_lines = windows * (intervals.log_lines_per_window + 1)  # and the left-out count
    logs = problem_lines * (len(longest) + name) + warning_lines * (WARNING_CHARS + name)
    alerts = {
        event: v["bytes"] / v["count"]
        for event, v in stored["events"]["by_event"].items()
        if event.startswith("beamline-inn.exposures.")
    }
    events = seconds / intervals.events_s * sum(alerts.values()) + artifacts
    return {
        "hours": SCAN_HOURS,
        **per_kind,
        "progress_and_summary_bytes": others,
        "artifacts_mb": artifacts / 1e6,
        "log_lines_at_most": problem_lines + warning_lines,
        "log_mb_at_most": logs / 1e6,
        "artifacts_and_logs_mb_at_most": (artifacts + logs) / 1e6,
        "budget_mb": BUDGET_MB,
        "within_budget": (artifacts + logs) / 1e6 <= BUDGET_MB,
        "bytes_per_alert_event": alerts,
        "event_mb_at_most": events / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exposures", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--factor", type=float, default=60.0, help="the hour's speed-up")
    parser.add_argument("--rate", type=float, default=25.0, help="exposures/s of the scan")
    parser.add_argument(
        "--budget-only",
        action="store_true",
        help="measure only what a long scan stores, into the results beside the others",
    )
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if args.budget_only:
        with tempfile.TemporaryDirectory() as folder:
            if not os.environ.get("PREFECT_API_URL"):
                os.environ["PREFECT_HOME"] = str(Path(folder) / "prefect-home")
            budget = budget_hour(args.factor, args.rate, Path(folder))
        stored = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        RESULTS.write_text(json.dumps(stored | {"artifact_budget": budget}, indent=2) + "\n")
        print(json.dumps(budget, indent=2))
        return
    n = args.exposures
    runs: dict[str, list[dict]] = {"plain": [], "flow": [], "watched": []}
    with tempfile.TemporaryDirectory() as folder:
        if not os.environ.get("PREFECT_API_URL"):  # the ephemeral server's database, measured
            os.environ["PREFECT_HOME"] = str(Path(folder) / "prefect-home")
        flow(16, Path(folder), "warm-up")  # Prefect's server start and imports, not timed
        for repeat in range(args.repeats):
            for way, function in (("plain", plain), ("flow", flow), ("watched", watched)):
                result = function(n, Path(folder), f"{way}-{repeat}")
                assert result["written"] == n, result
                runs[way].append(result)
                print(
                    way, repeat, {k: v for k, v in result.items() if k != "flow_run_id"}, flush=True
                )
        api = count_api_objects(runs["flow"][-1]["flow_run_id"])
        budget = budget_hour(args.factor, args.rate, Path(folder))
        print("budget", json.dumps(budget.get("extrapolated", budget)), flush=True)

    def median(way: str, key: str) -> float:
        return float(np.median([run[key] for run in runs[way]]))

    plain_ms = 1e3 * median("plain", "wall_s") / n
    flow_ms = 1e3 * median("flow", "wall_s") / n
    watched_ms = 1e3 * median("watched", "wall_s") / n
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "exposures": n,
        "samples_per_exposure": InferenceConfig().n_samples,
        "batch": BATCH,
        "repeats": args.repeats,
        "runs": runs,
        "plain_ms_per_exposure": plain_ms,
        "flow_ms_per_exposure": flow_ms,
        "prefect_overhead_ms_per_exposure": flow_ms - plain_ms,
        "prefect_overhead_fraction": flow_ms / plain_ms - 1,
        "watched_ms_per_exposure": watched_ms,
        "live_page_watched_overhead_fraction": watched_ms / flow_ms - 1,
        "wall_spread_ms_per_exposure": {
            way: [
                1e3 * min(r["wall_s"] for r in runs[way]) / n,
                1e3 * max(r["wall_s"] for r in runs[way]) / n,
            ]
            for way in runs
        },
        "feeder_cpu_ms_per_exposure": {way: 1e3 * median(way, "cpu_s") / n for way in runs},
        "api_objects_of_one_flow_run": api,
        "artifact_budget": budget,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    save(RESULTS, report)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
