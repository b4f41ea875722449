"""How many exposures per second one results writer can store (issue: streaming engine): the
ceiling the engine has whatever its workers' speed, side by side for block sizes, the
workers' message sizes and two file layouts.

Every exposure of a scan passes through the scan's one writer process, so its cost per
exposure bounds the engine's throughput however fast the GPU workers are. This benchmark
times, in this process, the writer's work as :mod:`workers.writer` does it
(:func:`workers.writer.rows_of` for each message: decode and check it; then
:func:`workers.writer.store`: append the block of rows, flush, encode the ``acks``
message) on the messages a worker sends for the shipped model's posteriors (1,000 draws) of
simulated line-outs (:func:`workers.inference.run_batch`: one ``results`` message per
batch); receiving them from ZeroMQ is left out.

The writer appends whatever has arrived, up to :data:`workers.writer.MAX_BLOCK` exposures
(at a GPU worker's rate the blocks are full). Measured: blocks of 1 to 1,024 exposures made
of the messages of CPU workers' batches (8 exposures; 1 for blocks of 1), and full blocks of
a GPU worker's batches (1,024 per message); each for two layouts of the per-exposure arrays:
one exposure per HDF5 chunk, and :data:`CHUNK_BYTES` per chunk (the writer's). Medians of
``--repeats``; the ceiling is 1 / (time per exposure) in full blocks of the writer's layout,
set against the engine's GPU target of 20,000 exposures/s. Each file is deleted once
measured; the bytes per exposure give the disk bandwidth that target needs (the page
cache's write-back is not timed). Side by side, full blocks with each compression of the
posterior draws (:data:`pipeline.store.results.SAMPLES_FILTERS`: none, the default; gzip;
bitshuffle-LZ4), with fewer draws stored (``store.stored_samples``: 100, and 0 for the
summaries alone, the workers' messages still carrying 1,000), and the time per exposure to
finish the file when the scan ends (the NXcanSAS groups).

Then the writer against the disk (issue: frame-rate integration): ``--disk-exposures`` in full
blocks of GPU batches appended to a file in ``--folder`` and synced to the disk (``fsync``),
from the first append to the end of the sync, in MB/s of the file (what bounds the rate a scan
streams at); then closed (the NXcanSAS group per exposure) and synced again, in MB/s of the
whole file from the first append (when the file is complete); the same with only the first
exposure's ``SASdata`` group (``store.sasdata_groups: first``, for high-rate scans). Beside them, the same number
of bytes written by ``dd`` (4 MiB blocks, ``conv=fdatasync``) into the same folder: the
disk's own bandwidth there. The target: the writer at >= 0.7 of ``dd``.

Run: ``python -m benchmarks.writer [--exposures 4096] [--repeats 3] [--disk-exposures 16384]
[--folder DIR]`` (results in ``benchmarks/results/writer.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch

from benchmarks.report import save
from pipeline.config import PipelineConfig, TransportConfig
from pipeline.model import load
from pipeline.model.posterior import CountsSampler
from pipeline.physics import PARAMETER_NAMES, PARAMETER_UNITS, simulate
from pipeline.store import ResultsWriter
from pipeline.store.results import CHUNK_BYTES, SAMPLES_FILTERS
from pipeline.transport.messages import LineOutMessage, Results, read_as
from workers.inference import run_batch
from workers.writer import MAX_BLOCK, rows_of, store

RESULTS = Path(__file__).parent / "results" / "writer.json"
BLOCKS = (1, 8, 64, 256, 1024)
CPU_BATCH = 8
GPU_BATCH = 1024
LAYOUTS = {"one_exposure_per_chunk": 0, f"{CHUNK_BYTES // 1024}_KiB_chunks": CHUNK_BYTES}
N_SAMPLES = 1000
GPU_TARGET_PER_S = 20_000
#: draws stored per exposure in the cases with fewer (``store.stored_samples``)
STORED_SAMPLES = (100, 0)


def line_out_messages(model: CountsSampler, n: int, seed: int) -> list[LineOutMessage]:
    """``n`` simulated line-outs as the feeder sends them (decoded)."""
    _, counts = simulate(n, np.random.default_rng(seed), model.prior, model.grid)
    sent = (
        LineOutMessage(
            index=index,
            scan_id="writer-benchmark",
            counts=row.astype(np.float32),
            counts_sd=np.sqrt(np.maximum(row, 1.0)).astype(np.float32),
            timestamp=time.time(),
            normalization=1.0,
        )
        for index, row in enumerate(counts)
    )
    return [read_as(LineOutMessage, message.to_frames()) for message in sent]


def worker_results(distinct: int = 256) -> dict[str, np.ndarray]:
    """The columns of ``distinct`` posteriors of the shipped model, as its workers send them."""
    torch.set_num_threads(1)
    model = load(device="cpu")
    line_outs = line_out_messages(model, distinct, seed=5)
    bytes_limit = TransportConfig().max_message_bytes
    arrays: dict[str, list[np.ndarray]] = {}
    for first in range(0, distinct, 32):
        batch = line_outs[first : first + 32]
        results, _ = run_batch(model, batch, N_SAMPLES, seed=first, max_message_bytes=bytes_limit)
        for message in results:
            assert isinstance(message, Results)  # (simulated line-outs do not fail)
            for name, array in message.columns.items():
                arrays.setdefault(name, []).append(array)
    return {name: np.concatenate(parts) for name, parts in arrays.items()}


def result_messages(columns: dict[str, np.ndarray], n: int, batch: int) -> list[list[bytes]]:
    """``n`` exposures as ``results`` messages of ``batch`` each: the distinct posteriors in
    ``columns`` repeated under new exposure indices."""
    distinct = len(columns["index"])
    messages = []
    for first in range(0, n, batch):
        rows = np.arange(first, min(n, first + batch))
        arrays = {name: column[rows % distinct] for name, column in columns.items()}
        arrays["index"] = rows.astype(np.int64)
        sources = tuple(f"simulated {row}" for row in rows.tolist())
        results = Results(columns=arrays, source=sources, frame_id=("",) * len(rows))
        messages.append([bytes(frame) for frame in results.to_frames()])
    return messages


@dataclass(frozen=True)
class Measured:
    """One file written: the writer's seconds per exposure while appending, seconds per
    exposure to finish it (the NXcanSAS groups, :meth:`ResultsWriter.close`), and its bytes
    per exposure."""

    append_s: float
    finish_s: float
    bytes: float


def new_writer(path: Path, stored_samples: int = N_SAMPLES, **options: Any) -> ResultsWriter:
    """The scan's results writer at ``path`` for the default model's parameters and q grid,
    storing ``stored_samples`` draws per exposure (``options``: the layout's)."""
    grid = PipelineConfig(scan_id="writer-benchmark").grid
    return ResultsWriter(
        path,
        PARAMETER_NAMES,
        PARAMETER_UNITS,
        stored_samples,
        grid.grid().q_nm,
        q_resolution_nm=grid.resolution_nm,
        **options,
    )


def append_in_blocks(writer: ResultsWriter, messages: list[list[bytes]], block: int) -> int:
    """Append ``messages`` as the writer process does, ``block`` exposures at a time; the
    exposures appended."""
    exposures, waiting = 0, 0
    blocks: list[dict[str, np.ndarray]] = []
    for frames in messages:
        rows = rows_of(writer, frames)
        if rows is None:
            raise RuntimeError("the writer refused a message of the benchmark (see its log line)")
        blocks.append(rows)
        waiting += len(rows["index"])
        if waiting >= block:
            store(writer, blocks)
            exposures += waiting
            blocks, waiting = [], 0
    if blocks:
        store(writer, blocks)
        exposures += waiting
    return exposures


def seconds_per_exposure(
    messages: list[list[bytes]],
    block: int,
    chunk_bytes: int,
    folder: Path,
    samples_compression: str = "none",
    stored_samples: int = N_SAMPLES,
) -> Measured:
    """The writer's work on ``messages``, in blocks of ``block``. The file is deleted after:
    the gigabytes of a whole run, left for the kernel to write back, would slow the later
    cases (measured: 0.107 instead of 0.039 ms per exposure in full blocks)."""
    path = folder / f"writer-{block}-{chunk_bytes}-{time.monotonic_ns()}.h5"
    writer = new_writer(
        path,
        stored_samples,
        chunk_bytes=chunk_bytes,
        samples_compression=samples_compression,
    )
    start = time.perf_counter()
    exposures = append_in_blocks(writer, messages, block)
    appended = time.perf_counter()
    writer.close(n_exposures=exposures)
    finished = time.perf_counter()
    size = path.stat().st_size
    path.unlink()
    return Measured(
        (appended - start) / exposures, (finished - appended) / exposures, size / exposures
    )


def dd_mb_per_s(folder: Path, n_bytes: int) -> float:
    """MB/s of ``dd`` writing ``n_bytes`` (4 MiB blocks) into ``folder`` and syncing them."""
    path = folder / f"dd-{time.monotonic_ns()}.bin"
    blocks = max(1, round(n_bytes / 4 / 2**20))
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={blocks}", "conv=fdatasync"],
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - start
    size = path.stat().st_size
    path.unlink()
    return size / elapsed / 1e6


@dataclass(frozen=True)
class OntoDisk:
    """The writer's MB/s onto the disk: while it appends (each block flushed, then the file
    synced: what bounds the rate a scan can stream at), and for the whole file (closing it
    adds a NXcanSAS ``SASdata`` group per exposure, then synced); the file's bytes."""

    appending_mb_per_s: float
    whole_file_mb_per_s: float
    bytes: int


def _sync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def writer_onto_disk(
    messages: list[list[bytes]], folder: Path, sasdata_groups: str = "every"
) -> OntoDisk:
    """The writer appending ``messages`` in full blocks to a file in ``folder``, then closing
    it (with ``sasdata_groups``), each synced onto the disk."""
    path = folder / f"writer-disk-{time.monotonic_ns()}.h5"
    writer = new_writer(path, sasdata_groups=sasdata_groups)
    start = time.perf_counter()
    exposures = append_in_blocks(writer, messages, MAX_BLOCK)
    _sync(path)
    appended = time.perf_counter()
    appended_bytes = path.stat().st_size
    writer.close(n_exposures=exposures)
    _sync(path)
    closed = time.perf_counter()
    size = path.stat().st_size
    path.unlink()
    return OntoDisk(appended_bytes / (appended - start) / 1e6, size / (closed - start) / 1e6, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exposures", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--disk-exposures",
        type=int,
        default=16384,
        help="exposures of the writer-against-dd case (34.9 kB each: 16,384 make 572 MB)",
    )
    parser.add_argument(
        "--folder",
        type=Path,
        default=Path.cwd(),
        help="where the writer-against-dd case writes (default: the current folder, a disk "
        "where results go; the temporary folder may be in memory)",
    )
    args = parser.parse_args()
    columns = worker_results()
    runs = {  # name: (messages, writer block)
        **{
            f"cpu_batches_block_{block}": (
                result_messages(columns, args.exposures, min(block, CPU_BATCH)),
                block,
            )
            for block in BLOCKS
        },
        f"gpu_batches_block_{MAX_BLOCK}": (
            result_messages(columns, args.exposures, GPU_BATCH),
            MAX_BLOCK,
        ),
    }
    times: dict[str, dict[str, list[float]]] = {layout: {r: [] for r in runs} for layout in LAYOUTS}
    sizes: dict[str, float] = {}
    full = f"gpu_batches_block_{MAX_BLOCK}"
    by_compression: dict[str, list[Measured]] = {name: [] for name in SAMPLES_FILTERS}
    by_stored: dict[int, list[Measured]] = {stored: [] for stored in STORED_SAMPLES}
    with tempfile.TemporaryDirectory() as name:
        for _ in range(args.repeats):
            for layout, chunk_bytes in LAYOUTS.items():
                for run, (messages, block) in runs.items():
                    measured = seconds_per_exposure(messages, block, chunk_bytes, Path(name))
                    times[layout][run].append(measured.append_s)
                    sizes[layout] = measured.bytes
            for compression, measures in by_compression.items():
                messages, block = runs[full]
                measures.append(
                    seconds_per_exposure(messages, block, CHUNK_BYTES, Path(name), compression)
                )
            for stored, measured in by_stored.items():
                messages, block = runs[full]
                measured.append(
                    seconds_per_exposure(
                        messages, block, CHUNK_BYTES, Path(name), stored_samples=stored
                    )
                )
    disk_messages = result_messages(columns, args.disk_exposures, GPU_BATCH)
    writer_disk: list[OntoDisk] = []
    first_group_only: list[OntoDisk] = []
    dd_disk: list[float] = []
    with tempfile.TemporaryDirectory(dir=args.folder) as name:
        for _ in range(args.repeats):  # alternating, so that drifts hit all alike
            writer_disk.append(writer_onto_disk(disk_messages, Path(name)))
            first_group_only.append(writer_onto_disk(disk_messages, Path(name), "first"))
            dd_disk.append(dd_mb_per_s(Path(name), writer_disk[-1].bytes))
    appending = [measured.appending_mb_per_s for measured in writer_disk]
    whole_file = [measured.whole_file_mb_per_s for measured in writer_disk]
    whole_file_first = [measured.whole_file_mb_per_s for measured in first_group_only]
    per_exposure_ms = {
        layout: {run: round(1e3 * float(np.median(v)), 4) for run, v in by_run.items()}
        for layout, by_run in times.items()
    }
    now = f"{CHUNK_BYTES // 1024}_KiB_chunks"
    ceiling = 1e3 / per_exposure_ms[now][full]
    compressions = {
        compression: {
            "append_ms_per_exposure": round(1e3 * median(m.append_s for m in measures), 4),
            "exposures_per_s": round(1 / median(m.append_s for m in measures)),
            "finish_ms_per_exposure": round(1e3 * median(m.finish_s for m in measures), 4),
            "file_bytes_per_exposure": round(median(m.bytes for m in measures)),
        }
        for compression, measures in by_compression.items()
    }
    report = {
        "machine": {"platform": platform.platform()},
        "exposures": args.exposures,
        "samples_per_exposure": N_SAMPLES,
        "repeats": args.repeats,
        "per_exposure_ms": per_exposure_ms,
        "exposures_per_s": {
            layout: {run: round(1e3 / ms) for run, ms in by_run.items()}
            for layout, by_run in per_exposure_ms.items()
        },
        "layout_speed_up_full_blocks": round(
            per_exposure_ms["one_exposure_per_chunk"][full] / per_exposure_ms[now][full], 3
        ),
        "full_blocks_of_cpu_batches_per_s": round(
            1e3 / per_exposure_ms[now][f"cpu_batches_block_{MAX_BLOCK}"]
        ),
        "ceiling_per_s": round(ceiling),
        "ceiling_against_gpu_target": round(ceiling / GPU_TARGET_PER_S, 3),
        "file_bytes_per_exposure": round(sizes[now]),
        "disk_mb_per_s_at_gpu_target": round(sizes[now] * GPU_TARGET_PER_S / 1e6),
        "samples_compression_full_blocks": compressions,
        "stored_samples_full_blocks": {
            str(stored): {
                "append_ms_per_exposure": round(1e3 * median(m.append_s for m in measured), 4),
                "exposures_per_s": round(1 / median(m.append_s for m in measured)),
                "file_bytes_per_exposure": round(median(m.bytes for m in measured)),
            }
            for stored, measured in by_stored.items()
        },
        "against_the_disk": {
            "folder": str(args.folder),
            "exposures": args.disk_exposures,
            "writer_mb_per_s": [round(v, 1) for v in appending],
            "dd_mb_per_s": [round(v, 1) for v in dd_disk],
            "writer_over_dd": round(float(np.median(np.divide(appending, dd_disk))), 3),
            "whole_file_mb_per_s": [round(v, 1) for v in whole_file],
            "whole_file_over_dd": round(float(np.median(np.divide(whole_file, dd_disk))), 3),
            "whole_file_first_group_mb_per_s": [round(v, 1) for v in whole_file_first],
            "whole_file_first_group_over_dd": round(
                float(np.median(np.divide(whole_file_first, dd_disk))), 3
            ),
            "target_min": 0.7,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    save(RESULTS, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
