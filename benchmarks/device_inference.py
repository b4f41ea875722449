"""Posterior sampling on a GPU: throughput and latency by batch size, and agreement with the CPU.

For the shipped model: exposures per second at 1,000 samples each, for batches of 1 to 16,384
exposures (median of 5 timed calls after 2 warm-ups, CUDA synchronised, line-outs already on
the device), and, on 8 exposures, the posterior medians and sds drawn on the GPU against
those drawn on the CPU (4,000 samples each, width folded to the narrow-line solution; they
differ only by Monte Carlo error).

Then the inference worker's whole batch as the streaming engine runs it
(:func:`workers.inference.run_batch`: line-out messages in; draws, summaries and the
posterior-predictive z on the GPU; copies to pinned host memory; ``results`` messages out),
for batches of 256 to 2,048 (median of 3 after a warm-up), and the results writer's work on
those messages (:func:`workers.writer.store`, full blocks): the two stages a GPU scan's
exposures pass besides the feeder. The quality flags of the GPU's ``z`` are compared with
numpy's on the CPU for the same draws.

Run on a machine with CUDA: ``python -m benchmarks.device_inference --out results.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import save
from benchmarks.writer import line_out_messages
from pipeline.config import TransportConfig
from pipeline.model import load
from pipeline.physics import PARAMETER_NAMES, PARAMETER_UNITS, simulate
from pipeline.physics.quality import Z_THRESHOLD, predictive_z
from pipeline.store import ResultsWriter
from pipeline.transport.messages import Results, read_as
from workers.inference import run_batch
from workers.writer import MAX_BLOCK, rows_of, store

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


WORKER_BATCHES = (256, 1024, 2048)


def worker_and_writer(
    gpu: torch.nn.Module, folder: Path, batches: tuple[int, ...] = WORKER_BATCHES
) -> dict:
    """Exposures/s of the worker's whole batch on the GPU and of the writer on its messages."""
    limit = TransportConfig().max_message_bytes
    out: dict = {"worker": [], "writer": {}}
    messages: list = []
    for batch in batches:
        line_outs = line_out_messages(gpu, batch, seed=batch)
        times = []
        for attempt in range(4):
            start = time.perf_counter()
            results, inferred = run_batch(
                gpu, line_outs, 1000, seed=attempt, max_message_bytes=limit
            )
            messages = [message.to_frames() for message in results]  # as the worker sends
            if inferred != batch:
                raise RuntimeError(f"{batch - inferred} of {batch} line-outs failed on the GPU")
            if attempt:
                times.append(time.perf_counter() - start)
        latency = float(np.median(times))
        out["worker"].append(
            {"batch": batch, "latency_ms": 1e3 * latency, "exposures_per_s": batch / latency}
        )
    # the largest batch's messages, stored as the writer does, in full blocks
    frames = [[bytes(f) for f in message] for message in messages] * 4
    writer = ResultsWriter(
        folder / "gpu-writer.h5",
        PARAMETER_NAMES,
        PARAMETER_UNITS,
        1000,
        gpu.grid.q_nm,
        scan_id="gpu",
    )
    blocks, stored, start = [], 0, time.perf_counter()
    for number, message in enumerate(frames):
        rows = rows_of(writer, message)
        if rows is None:
            raise RuntimeError("the writer refused a GPU worker's message")
        rows["index"] = rows["index"] + number * batches[-1]
        blocks.append(rows)
        stored += len(rows["index"])
        if sum(len(b["index"]) for b in blocks) >= MAX_BLOCK:
            store(writer, blocks)
            blocks = []
    if blocks:
        store(writer, blocks)
    seconds = time.perf_counter() - start
    writer.close()
    out["writer"] = {"exposures": stored, "exposures_per_s": stored / seconds}
    # the flags of the GPU's z against numpy's for the same draws
    decoded = [read_as(Results, message) for message in messages]
    draws = np.concatenate([m.columns["samples"] for m in decoded])
    counts = np.concatenate([m.columns["counts"] for m in decoded])
    z_gpu = np.concatenate([m.columns["predictive_z"] for m in decoded])
    z_cpu = predictive_z(counts, draws, gpu.grid, seed=0)
    out["flags_agree"] = float(np.mean((z_gpu > Z_THRESHOLD) == (z_cpu > Z_THRESHOLD)))
    return out


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
    with tempfile.TemporaryDirectory() as folder:
        report["engine_stages"] = worker_and_writer(gpu, Path(folder))
    save(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
