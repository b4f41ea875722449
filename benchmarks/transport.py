"""What the streaming engine costs per exposure, and how it scales with workers (issue:
streaming engine), side by side in one run at 1,000 samples per exposure.

Ways through the same simulated line-outs, timed from the first line-out handed over to the
last exposure written (process start-up left out), all in batches of
``inference.max_batch`` (as a worker batches):

1. **in process**: :meth:`PosteriorModel.sample`, the summaries and the posterior-predictive
   check, plus :class:`ResultsWriter` appending each batch as one block and flushing, in this process, on 1 torch thread and on all cores (with
   :func:`~pipeline.model.allocator.retain_freed_memory`, as the workers run);
2. **the engine**: :class:`Feeder` (``submit_line_out``: feeder -> credits over ZeroMQ
   -> worker -> writer -> ack) with 1 worker of 1 thread, 2 workers of 1 thread, and 1
   worker on all cores;
3. **a remote worker**: the engine with no local worker and one ``beamline-inn worker`` of 1
   thread connected over loopback ``tcp://`` with CURVE keys (results travel back through the
   feeder to the writer), timed from the moment it has joined.

The engine's overhead is (2, one worker of one thread) against (1, one thread): the same
computation, with the transport and the processes added; the scaling is (2, two workers)
against (2, one worker); the price of a remote worker is (3) against (2, one worker of one
thread). Beside the wall time, the CPU time of every process involved (feeder, workers,
writer; ``/proc/PID/stat``) is summed over the same interval: the engine's CPU cost per
exposure against the model's in process does not depend on how many cores the machine has
to spare; it is also given per process (feeder, writer, workers). Each figure is the
median of ``--repeats`` runs.

Last, once, the engine's own CPU per exposure at a high rate: 8,000 line-outs through one
worker drawing 2 samples each (batches up to 512), so that the feeder and the writer handle
thousands of exposures per second, as they would beside a GPU worker.

Run: ``python -m benchmarks.transport [--exposures 300] [--repeats 3]``
(results in ``benchmarks/results/transport.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import save
from pipeline.config import InferenceConfig, PipelineConfig, TransportConfig
from pipeline.exposure import Exposure, LineOut, PosteriorSamples
from pipeline.model import load
from pipeline.model.allocator import retain_freed_memory
from pipeline.physics import QGrid, simulate
from pipeline.physics.quality import predictive_z
from pipeline.store import ExposureResult, ResultsWriter
from pipeline.transport.security import create_keypair
from workers.feeder import Feeder

RESULTS = Path(__file__).parent / "results" / "transport.json"
N_SAMPLES = 1000
BATCH = InferenceConfig().batch_limit("cpu")
HIGH_RATE_EXPOSURES = 8000


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process(counts: np.ndarray, threads: int, folder: Path) -> tuple[float, float]:
    """Seconds for all exposures through the model and the file in this process, and the
    CPU seconds used meanwhile."""
    torch.set_num_threads(threads)
    model = load(device="cpu")
    batch = BATCH
    q = QGrid().q_nm
    writer = ResultsWriter(
        folder / f"in-process-{time.monotonic_ns()}.h5",
        model.parameter_names,
        model.parameter_units,
        N_SAMPLES,
        q,
    )
    start, cpu = time.perf_counter(), time.process_time()
    for first in range(0, len(counts), batch):
        rows = counts[first : first + batch].astype(np.float32)
        posterior = PosteriorSamples(
            model.sample(rows, N_SAMPLES, seed=first), model.parameter_names, model.parameter_units
        )
        summaries = posterior.summaries()
        z = predictive_z(rows, posterior.samples, model.grid, seed=first)  # as workers do
        writer.append_many(  # one block per batch, as the writer process appends
            [
                ExposureResult(
                    index=first + row,
                    timestamp=time.time(),
                    normalization=1.0,
                    counts=line_out,
                    counts_sd=np.sqrt(np.maximum(line_out, 1.0)),
                    samples=posterior.samples[row],
                    mean=summaries["mean"][row],
                    sd=summaries["sd"][row],
                    quantiles=summaries["quantiles"][row],
                    predictive_z=float(z[row]),
                )
                for row, line_out in enumerate(rows)
            ]
        )
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    writer.close()
    return elapsed, cpu


def through_engine(
    counts: np.ndarray,
    n_workers: int,
    threads: int,
    folder: Path,
    remote: bool = False,
    n_samples: int = N_SAMPLES,
    max_batch: int | None = None,
) -> tuple[float, dict[str, float], float]:
    """Seconds from the first line-out submitted to the last acknowledged, the CPU seconds
    of the processes meanwhile (feeder, writer, workers), and the median latency (ms); with
    ``remote``, through one remote worker over CURVE instead."""
    transport = TransportConfig()
    if remote:
        keys = folder / f"keys-{time.monotonic_ns()}"
        for name in ("feeder", "worker"):
            create_keypair(keys, name)
        (keys / "authorized").mkdir()
        (keys / "authorized" / "worker.key").write_bytes((keys / "worker.key").read_bytes())
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            url = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
        transport = TransportConfig(
            remote_work=url,
            curve_secret_key=keys / "feeder.key_secret",
            curve_authorized_keys=keys / "authorized",
        )
        command = ["worker", "--connect", url, "--once", "--threads", str(threads)]
        command += ["--key", str(keys / "worker.key_secret")]
        command += ["--server-key", str(keys / "feeder.key")]
        worker = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *command], stdout=subprocess.DEVNULL
        )
    config = PipelineConfig(
        scan_id=f"transport-{n_workers}-{time.monotonic_ns()}",
        n_workers=n_workers,
        output_dir=folder,
        inference=InferenceConfig(n_samples=n_samples, threads=threads, max_batch=max_batch),
        transport=transport,
    )
    q = QGrid().q_nm
    with Feeder(config) as feeder:
        while remote and feeder.remote_workers == 0:
            feeder.collect(timeout_ms=100)
        writer, *workers = feeder.pids  # the writer is started first
        roles = {"feeder": [os.getpid()], "writer": [writer]}
        roles["workers"] = [*workers, *([worker.pid] if remote else [])]
        before = {role: sum(_cpu_s(pid) for pid in pids) for role, pids in roles.items()}
        start = time.perf_counter()
        for index, row in enumerate(counts):
            exposure = Exposure(config.scan_id, index, time.time(), None)
            feeder.submit_line_out(exposure, LineOut(q, row, np.sqrt(np.maximum(row, 1.0))))
        summary = feeder.wait()
        elapsed = time.perf_counter() - start
        cpu = {
            role: sum(_cpu_s(pid) for pid in pids) - before[role] for role, pids in roles.items()
        }
    if remote:
        worker.wait(timeout=30)
    return elapsed, cpu, summary.latency_p50_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exposures", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    retain_freed_memory()  # in process as in the workers
    _, counts = simulate(args.exposures, np.random.default_rng(0))
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    latency: dict[str, list[float]] = {}
    by_role: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        for _ in range(args.repeats):
            for threads in sorted({1, cores}):
                label = f"in_process_{threads}_threads"
                elapsed, used = in_process(counts, threads, folder)
                times.setdefault(label, []).append(elapsed)
                cpu.setdefault(label, []).append(used)
            for n_workers, threads in sorted({(1, 1), (2, 1), (1, cores)}):
                label = f"engine_{n_workers}_workers_{threads}_threads_each"
                elapsed, used, p50 = through_engine(counts, n_workers, threads, folder)
                times.setdefault(label, []).append(elapsed)
                cpu.setdefault(label, []).append(sum(used.values()))
                by_role.setdefault(label, []).append(used)
                latency.setdefault(label, []).append(p50)
            label = "engine_1_remote_worker_curve_1_thread"
            elapsed, used, p50 = through_engine(counts, 0, 1, folder, remote=True)
            times.setdefault(label, []).append(elapsed)
            cpu.setdefault(label, []).append(sum(used.values()))
            by_role.setdefault(label, []).append(used)
            latency.setdefault(label, []).append(p50)
        # the engine's own cost at a high rate: 2 draws per exposure, so the model costs
        # little and the feeder and the writer handle thousands of exposures per second
        many = np.resize(counts, (HIGH_RATE_EXPOSURES, counts.shape[1]))
        elapsed, used, _ = through_engine(many, 1, 1, folder, n_samples=2, max_batch=512)
        high_rate = {
            "exposures": HIGH_RATE_EXPOSURES,
            "samples_per_exposure": 2,
            "exposures_per_s": round(HIGH_RATE_EXPOSURES / elapsed),
            "cpu_us_per_exposure": {
                role: round(1e6 * seconds / HIGH_RATE_EXPOSURES, 1)
                for role, seconds in used.items()
            },
        }
    per_exposure_ms = {
        label: round(1e3 * float(np.median(values)) / args.exposures, 3)
        for label, values in times.items()
    }
    cpu_ms = {
        label: round(1e3 * float(np.median(values)) / args.exposures, 3)
        for label, values in cpu.items()
    }
    one = per_exposure_ms["engine_1_workers_1_threads_each"]
    report = {
        "machine": {"platform": platform.platform(), "cores": cores},
        "exposures": args.exposures,
        "samples_per_exposure": N_SAMPLES,
        "max_batch": BATCH,
        "repeats": args.repeats,
        "per_exposure_ms": per_exposure_ms,
        "cpu_per_exposure_ms": cpu_ms,
        "cpu_per_exposure_ms_by_process": {
            label: {
                role: round(1e3 * float(np.median([run[role] for run in runs])) / args.exposures, 3)
                for role in runs[0]
            }
            for label, runs in by_role.items()
        },
        "latency_p50_ms": {k: round(float(np.median(v)), 1) for k, v in latency.items()},
        "high_rate": high_rate,
        "engine_overhead": round(one / per_exposure_ms["in_process_1_threads"] - 1.0, 3),
        "engine_cpu_overhead": round(
            cpu_ms["engine_1_workers_1_threads_each"] / cpu_ms["in_process_1_threads"] - 1.0, 3
        ),
        "two_workers_speed_up": round(one / per_exposure_ms["engine_2_workers_1_threads_each"], 3),
        "remote_worker_overhead": round(
            per_exposure_ms["engine_1_remote_worker_curve_1_thread"] / one - 1.0, 3
        ),
        "targets": {"overhead_max": 0.10, "two_workers_speed_up_min": 1.6},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    save(RESULTS, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
