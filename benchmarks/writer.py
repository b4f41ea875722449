"""How many exposures per second one results writer can store (issue: streaming engine): the
ceiling the engine has whatever its workers' speed, side by side for two file layouts.

Every exposure of a scan passes through the scan's one writer process, so its cost per
exposure bounds the engine's throughput however fast the GPU workers are. This benchmark
times, in this process, the writer's work per exposure as :mod:`workers.writer` does it:
decode the worker's result message, append a block of them to the file
(:meth:`ResultsWriter.append_many`, one flush), and encode each acknowledgement. The result
messages are those a worker sends for the shipped model's posteriors (1,000 draws) of
simulated line-outs (:func:`workers.inference.run_batch`); receiving them from ZeroMQ is left out.

Blocks of 1, 8, 64 and 256 exposures (the writer appends whatever has arrived, up to 256: at
a GPU worker's rate the blocks are full), for two layouts of the uncompressed per-exposure
arrays: one exposure per HDF5 chunk (the layout before), and :data:`CHUNK_BYTES` per chunk
(now). Medians of ``--repeats``; the ceiling is 1 / (time per exposure), set against the
engine's GPU target of 20,000 exposures/s.

Run: ``python -m benchmarks.writer [--exposures 512] [--repeats 3]``
(results in ``benchmarks/results/writer.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import PipelineConfig
from pipeline.model import load
from pipeline.physics import PARAMETER_NAMES, PARAMETER_UNITS, simulate
from pipeline.store import ResultsWriter
from pipeline.store.results import CHUNK_BYTES
from pipeline.transport import decode, encode
from workers.inference import run_batch
from workers.writer import acknowledgement, to_result

RESULTS = Path(__file__).parent / "results" / "writer.json"
BLOCKS = (1, 8, 64, 256)
LAYOUTS = {"one_exposure_per_chunk": 0, f"{CHUNK_BYTES // 1024}_KiB_chunks": CHUNK_BYTES}
N_SAMPLES = 1000
GPU_TARGET_PER_S = 20_000


def result_messages(n: int, distinct: int = 256) -> list[list[bytes]]:
    """``n`` result messages (frames as bytes) as a worker sends them: ``distinct`` posteriors
    of the shipped model, repeated under new exposure indices."""
    torch.set_num_threads(1)
    model = load(device="cpu")
    _, counts = simulate(distinct, np.random.default_rng(5), model.prior, model.grid)
    line_outs = [
        decode(
            encode(
                "line_out",
                {"index": index, "timestamp": time.time(), "normalization": 1.0},
                counts=row.astype(np.float32),
                counts_sd=np.sqrt(np.maximum(row, 1.0)).astype(np.float32),
            )
        )
        for index, row in enumerate(counts)
    ]
    distinct_frames = []
    for first in range(0, distinct, 32):
        outgoing, _ = run_batch(model, line_outs[first : first + 32], N_SAMPLES, seed=first)
        distinct_frames += [[bytes(frame) for frame in frames] for frames in outgoing]
    messages = []
    for index in range(n):
        message = decode(distinct_frames[index % distinct])
        message.header["index"] = index
        messages.append(
            [bytes(frame) for frame in encode("result", message.header, **message.arrays)]
        )
    return messages


def store(messages: list[list[bytes]], block: int, chunk_bytes: int, folder: Path) -> float:
    """Seconds per exposure for the writer's work on ``messages``, appended ``block`` at a time."""
    writer = ResultsWriter(
        folder / f"writer-{block}-{chunk_bytes}-{time.monotonic_ns()}.h5",
        PARAMETER_NAMES,
        PARAMETER_UNITS,
        N_SAMPLES,
        PipelineConfig(scan_id="writer-benchmark").grid.grid().q_nm,
        chunk_bytes=chunk_bytes,
    )
    start = time.perf_counter()
    for first in range(0, len(messages), block):
        results = [to_result(decode(frames)) for frames in messages[first : first + block]]
        for result, written in zip(results, writer.append_many(results), strict=True):
            acknowledgement(result, written)
    seconds = (time.perf_counter() - start) / len(messages)
    writer.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exposures", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    messages = result_messages(args.exposures)
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BLOCKS} for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as name:
        for _ in range(args.repeats):
            for layout, chunk_bytes in LAYOUTS.items():
                for block in BLOCKS:
                    times[layout][block].append(store(messages, block, chunk_bytes, Path(name)))
    per_exposure_ms = {
        layout: {str(b): round(1e3 * float(np.median(v)), 4) for b, v in by_block.items()}
        for layout, by_block in times.items()
    }
    now = f"{CHUNK_BYTES // 1024}_KiB_chunks"
    ceiling = 1e3 / per_exposure_ms[now][str(BLOCKS[-1])]
    report = {
        "machine": {"platform": platform.platform()},
        "exposures": args.exposures,
        "samples_per_exposure": N_SAMPLES,
        "message_bytes": sum(len(frame) for frame in messages[0]),
        "repeats": args.repeats,
        "per_exposure_ms": per_exposure_ms,
        "exposures_per_s": {
            layout: {b: round(1e3 / ms) for b, ms in by_block.items()}
            for layout, by_block in per_exposure_ms.items()
        },
        "layout_speed_up_full_blocks": round(
            per_exposure_ms["one_exposure_per_chunk"][str(BLOCKS[-1])]
            / per_exposure_ms[now][str(BLOCKS[-1])],
            3,
        ),
        "ceiling_per_s": round(ceiling),
        "ceiling_against_gpu_target": round(ceiling / GPU_TARGET_PER_S, 3),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
