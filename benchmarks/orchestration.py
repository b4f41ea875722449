"""What Prefect costs per exposure (issue: orchestration), side by side in one run.

The same simulated scan (Eiger 4M frames, sector integration, 1,000 posterior samples per
exposure, 2 inference workers, HDF5 write) two ways, alternating, ``--repeats`` times:

1. **plain**: a :class:`Feeder` fed in batches of 16 frames from this process, no Prefect;
2. **flow**: the ``reconstruct-scan`` flow (what ``beamline-inn demo`` runs): the same batches
   as Prefect tasks, with the :class:`~flows.monitor.ScanMonitor` publishing progress, the
   recent-exposures table, the plots and events, and the summary artifact.

Both are timed from the first frame to the last exposure written (``ScanSummary.wall_s``;
process start-up and Prefect's server start left out), and the CPU time of this process
(the feeder, and in the flow also the monitor's thread and Prefect's client) over the same
interval (``ScanSummary.feeder_cpu_s``). Prefect's overhead per exposure is the difference divided by the exposures.
The Prefect API calls are counted too: task runs and artifact updates grow with the scan's
length and batches, not with its exposures one by one.

Run: ``python -m benchmarks.orchestration [--exposures 300] [--repeats 3]`` (results in
``benchmarks/results/orchestration.json``). Without ``PREFECT_API_URL`` the flow runs on
Prefect's ephemeral server, started once before the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from itertools import islice
from pathlib import Path

import numpy as np

from benchmarks.report import save
from pipeline.config import InferenceConfig, PipelineConfig
from pipeline.sources import SimulatedDetector
from workers.feeder import Feeder

RESULTS = Path(__file__).parent / "results" / "orchestration.json"
BATCH = 16


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exposures", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    n = args.exposures
    runs: dict[str, list[dict]] = {"plain": [], "flow": []}
    with tempfile.TemporaryDirectory() as folder:
        flow(16, Path(folder), "warm-up")  # Prefect's server start and imports, not timed
        for repeat in range(args.repeats):
            for way, function in (("plain", plain), ("flow", flow)):
                result = function(n, Path(folder), f"{way}-{repeat}")
                assert result["written"] == n, result
                runs[way].append(result)
                print(
                    way, repeat, {k: v for k, v in result.items() if k != "flow_run_id"}, flush=True
                )
        api = count_api_objects(runs["flow"][-1]["flow_run_id"])

    def median(way: str, key: str) -> float:
        return float(np.median([run[key] for run in runs[way]]))

    plain_ms = 1e3 * median("plain", "wall_s") / n
    flow_ms = 1e3 * median("flow", "wall_s") / n
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
        "wall_spread_ms_per_exposure": {
            way: [
                1e3 * min(r["wall_s"] for r in runs[way]) / n,
                1e3 * max(r["wall_s"] for r in runs[way]) / n,
            ]
            for way in runs
        },
        "feeder_cpu_ms_per_exposure": {way: 1e3 * median(way, "cpu_s") / n for way in runs},
        "api_objects_of_one_flow_run": api,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    save(RESULTS, report)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
