"""Posterior sampling on a GPU: throughput and latency by batch size, and agreement with the CPU.

For the shipped model: exposures per second at 1,000 samples each, for batches of 1 to 16,384
exposures (median of 5 timed calls after 2 warm-ups, CUDA synchronised, line-outs already on
the device), and, on 8 exposures, the posterior medians and sds drawn on the GPU against
those drawn on the CPU (4,000 samples each, width folded to the narrow-line solution; they
differ only by Monte Carlo error).

Run on a machine with CUDA: ``python -m benchmarks.device_inference --out results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.model import load
from pipeline.physics import simulate

BATCHES = (1, 16, 64, 256, 1024, 4096, 16384)


def throughput(model: torch.nn.Module, batch: int, n_samples: int = 1000) -> dict:
    _, counts = simulate(batch, np.random.default_rng(batch), model.prior, model.grid)
    tensor = torch.from_numpy(counts).float().to(model.device)
    times = []
    with torch.inference_mode():
        for attempt in range(7):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.sample_tensor(tensor, n_samples)
            torch.cuda.synchronize()
            if attempt >= 2:
                times.append(time.perf_counter() - start)
    latency = float(np.median(times))
    return {"batch": batch, "latency_ms": 1000 * latency, "exposures_per_s": batch / latency}


def agreement(cpu: torch.nn.Module, gpu: torch.nn.Module) -> dict:
    _, counts = simulate(8, np.random.default_rng(99), cpu.prior, cpu.grid)
    a = cpu.sample(counts, 4000, seed=1).astype(np.float64)
    b = gpu.sample(counts, 4000, seed=1).astype(np.float64)
    for draws in (a, b):  # compare the narrow-line solution: the median of both modes
        draws[..., 1] = np.minimum(draws[..., 1], draws[..., 0] - draws[..., 1])  # is unstable
    sd = a.std(axis=1)
    return {
        "median_difference_in_sd_max": (np.abs(np.median(a, axis=1) - np.median(b, axis=1)) / sd)
        .max(axis=0)
        .tolist(),
        "sd_ratio_gpu_cpu": (b.std(axis=1) / sd).mean(axis=0).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    gpu = load(device="cuda")
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model_sha256": gpu.card["weights_sha256"],
        "samples_per_exposure": 1000,
        "throughput": [throughput(gpu, batch) for batch in BATCHES],
        "cpu_agreement": agreement(load(device="cpu"), gpu),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
