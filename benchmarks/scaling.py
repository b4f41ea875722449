"""How the costs grow (issue: benchmarks): with samples per exposure, with the detector's
size, and with batching; and the memory of each pipeline process.

1. **samples per exposure**: :meth:`PosteriorModel.sample` of one exposure on one thread,
   100 to 100,000 samples (eager, with :func:`retain_freed_memory` as the workers run);
2. **batched on the CPU**: exposures per second at 1,000 samples in batches of 1, 8 and 32 on
   one thread and on all cores;
3. **detector size**: pyFAI integration per frame (the pipeline's integrator, full ring, 512
   bins, CSR) for Pilatus 300K, Pilatus 1M, Eiger 1M and Eiger 4M geometries at 5 m;
4. **memory per process**: peak resident memory (VmHWM) of the feeder, an inference worker
   and the writer after a 64-exposure Eiger 4M scan through :class:`Feeder`.

Each timing is the median of ``--repeats``, with min and max.

Run: ``python -m benchmarks.scaling [--repeats 5] [--max-samples 100000]``
(results in ``benchmarks/results/scaling.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import save
from pipeline.config import IntegrationConfig, PipelineConfig
from pipeline.integration import LineOutIntegrator
from pipeline.model import load
from pipeline.model.allocator import retain_freed_memory
from pipeline.physics import QGrid, simulate
from pipeline.sources import SimulatedDetector
from workers.feeder import Feeder

RESULTS = Path(__file__).parent / "results" / "scaling.json"
DETECTORS = {  # pyFAI detector name, beam centre (m from the corner)
    "pilatus300k": ("Pilatus300k", 0.0420, 0.0416),
    "pilatus1m": ("Pilatus1M", 0.0845, 0.0897),
    "eiger1m": ("Eiger1M", 0.0400, 0.0385),
    "eiger4m": ("Eiger4M", 0.0813, 0.0777),
}


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": float(np.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
    }


def _timed(run, repeats: int) -> dict[str, float]:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return _stats(times)


def samples_scaling(repeats: int, max_samples: int) -> dict:
    torch.set_num_threads(1)
    model = load(device="cpu")
    _, counts = simulate(32, np.random.default_rng(0))
    out = {}
    n = 100
    while n <= max_samples:
        timing = _timed(lambda n=n: model.sample(counts[:1], n, seed=1), repeats)
        out[str(n)] = {k: 1e3 * v for k, v in timing.items()}
        print(f"{n} samples: {out[str(n)]['median']:.2f} ms", flush=True)
        n *= 10
    return {"ms_per_exposure_one_thread": out}


def batched(repeats: int) -> dict:
    model = load(device="cpu")
    _, counts = simulate(32, np.random.default_rng(0))
    out: dict[str, dict] = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for batch in (1, 8, 32):
            timing = _timed(lambda b=batch: model.sample(counts[:b], 1000, seed=2), repeats)
            out[f"{threads}_threads_batch_{batch}"] = {
                "exposures_per_s": batch / timing["median"],
                "ms_per_batch": 1e3 * timing["median"],
            }
            print(f"{threads} threads, batch {batch}: {batch / timing['median']:.0f}/s", flush=True)
    torch.set_num_threads(1)
    return out


def detector_sizes(repeats: int, folder: Path) -> dict:
    out = {}
    for label, (name, poni1, poni2) in DETECTORS.items():
        poni = folder / f"{label}.poni"
        poni.write_text(
            f"poni_version: 2\nDetector: {name}\nDetector_config: {{}}\nDistance: 5.0\n"
            f"Poni1: {poni1}\nPoni2: {poni2}\nRot1: 0\nRot2: 0\nRot3: 0\nWavelength: 1.55e-10\n"
        )
        integrator = LineOutIntegrator(
            IntegrationConfig(poni=poni, azimuth_range_deg=None), QGrid()
        )
        shape = tuple(integrator.geometry.detector.shape)
        frame = np.random.default_rng(0).poisson(2.0, shape).astype(np.int32)
        timing = _timed(lambda i=integrator, f=frame: i.integrate(f), repeats)
        out[label] = {
            "pixels": int(np.prod(shape)),
            "shape": list(shape),
            "integration_ms": {k: 1e3 * v for k, v in timing.items()},
        }
        print(f"{label} {shape}: {out[label]['integration_ms']['median']:.1f} ms", flush=True)
    return out


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_per_process(folder: Path, n: int = 64) -> dict:
    config = PipelineConfig(scan_id="memory", output_dir=folder)
    frames = [
        e.frame for e in SimulatedDetector(config.integration, seed=2).scan("m", 8).exposures()
    ]
    from pipeline.exposure import Exposure

    with Feeder(config) as feeder:
        for index in range(n):
            feeder.submit(Exposure("memory", index, time.time(), frames[index % len(frames)]))
            feeder.collect()
        feeder.wait()
        peaks = {name: _peak_rss_mb(pid) for name, pid in feeder.children.items()}
        peaks["feeder (this process, simulated frames included)"] = _peak_rss_mb(os.getpid())
    return {"peak_rss_mb": peaks, "exposures": n, "detector": "eiger4m"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-samples", type=int, default=100_000)
    args = parser.parse_args()
    retain_freed_memory()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        report = {
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "repeats": args.repeats,
            "samples": samples_scaling(args.repeats, args.max_samples),
            "batched_cpu": batched(args.repeats),
            "detectors": detector_sizes(args.repeats, folder),
            "memory": memory_per_process(folder),
        }
    RESULTS.parent.mkdir(exist_ok=True)
    save(RESULTS, report)
    print(json.dumps(report["memory"], indent=2))


if __name__ == "__main__":
    main()
