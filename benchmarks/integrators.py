"""Integration on several cores (issue: frame-rate integration), side by side in one run on
the same frames: Eiger 4M frames simulated for the default model's instrument (5 m, 512
bins), uint32 as the detector gives them, integrated in its sector (chi = 0 +- 5 degrees,
37,815 pixels) and on the full ring (535,799 pixels).

For each region, and k = 1, 2, ... up to the cores:

1. **bare pyFAI on k cores**: k processes, started together, each integrating the frames with
   pyFAI's ``integrate1d`` and the options of :class:`~pipeline.integration.LineOutIntegrator`
   (:func:`benchmarks.integration.bare_pyfai_loop`, one OpenMP thread each: a second thread
   makes an Eiger 4M sector slower, not faster); frames per second of all of them together;
2. **the integrator pool of k processes**
   (:class:`~pipeline.integration.pool.IntegratorPool`): the same frames handed over by this
   process as fast as they go (each copied once into a slot in shared memory), from the
   first hand-over to the last line-out back;
3. (k = 1) **the feeder's own engine**: :meth:`LineOutIntegrator.integrate` in this process,
   which applies pyFAI's CSR matrix to the pixels it names
   (:class:`~pipeline.integration.csr.CsrEngine`).

The same for the sector with the ``lut`` method (``sector_lut``): each engine, the feeder's
and the processes', is then pyFAI's own ``integrate1d`` (about 10 ms per frame), as every
engine was before the CSR engine, and as a scan configured with ``lut`` or ``histogram`` has.

The same again for the sector with the frames compressed as an Eiger's stream sends them
(bitshuffle-LZ4 in HDF5 framing,
:class:`~pipeline.sources.compression.EncodedFrame`): the feeder's engine then decodes
each frame before integrating it (what a scan with one engine does), and the pool's
processes decode them (``decode_frames=False``); only the compressed bytes are copied.

And for the sector with the decoded frames lying in shared memory already, as the read-ahead
reader (:class:`~pipeline.sources.ReadAhead`) leaves them for a scan of archived files: slot
files holding a :class:`~pipeline.scratch.SlotLease`, which the pool's processes read where
they lie (nothing is copied; the reader's decoding, done beforehand, is not timed). A frame
costs a process about 0.3 ms there, so this case hands over ``--read-ahead-frames`` per
process (2,000: most of a second), not ``--frames``: a run of 100 frames would time mostly
the processes' first touches of the slot files' pages.

The figures: the pool's scaling, pool(2) / pool(1) (target >= 1.6), for decoded frames
(either engine), compressed and read-ahead frames, the pool against bare pyFAI on as many
cores (what handing frames over costs), and the feeder's engine against bare pyFAI. Each is
the median of ``--repeats`` runs, with min and max; the cases alternate within a repeat, so
that drifts of the machine hit them alike.

Run: ``python -m benchmarks.integrators [--frames 96] [--read-ahead-frames 2000]
[--repeats 3]`` (results in
``benchmarks/results/integrators.json``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import struct
import tempfile
import time
from pathlib import Path

import bitshuffle
import numpy as np

from benchmarks.integration import bare_pyfai_loop
from benchmarks.report import save
from pipeline.config import IntegrationConfig
from pipeline.instrument import Instrument
from pipeline.integration import LineOutIntegrator
from pipeline.integration.pool import IntegratorPool
from pipeline.model.checkpoint import card_instrument, read_card
from pipeline.physics import QGrid
from pipeline.scratch import SlotLease, frame_view, shared_memory_folder
from pipeline.sources import SimulatedDetector
from pipeline.sources.compression import EncodedFrame

RESULTS = Path(__file__).parent / "results" / "integrators.json"


def eiger_frames(folder: Path, n: int) -> tuple[IntegrationConfig, Instrument, list[np.ndarray]]:
    """``n`` distinct Eiger 4M frames of the default model's instrument, with the
    integration settings of that instrument (its PONI written to ``folder``)."""
    from flows.scan import simulated_integration

    instrument = card_instrument(read_card(None))
    integration = simulated_integration(instrument, folder)
    simulated = SimulatedDetector(integration, instrument, seed=1).scan("integrators", n)
    return integration, instrument, [exposure.frame for exposure in simulated.exposures()]


def stream_encoded(frame: np.ndarray) -> EncodedFrame:
    """``frame`` compressed as an Eiger's stream sends it: bitshuffle-LZ4 after the 12-byte
    HDF5 filter header (bitshuffle's default block size)."""
    blob = bitshuffle.compress_lz4(np.ascontiguousarray(frame)).tobytes()
    header = struct.pack(">QI", frame.nbytes, 0)
    element = frame.dtype.itemsize
    return EncodedFrame(header + blob, frame.shape, frame.dtype.str, "bslz4", element, "hdf5")


def in_slot_files(frames: list[np.ndarray], folder: Path) -> list[np.ndarray]:
    """``frames`` copied into slot files in ``folder``, each handed out as the read-ahead
    reader hands out a frame (a view of its slot file holding a :class:`SlotLease`)."""
    leased = []
    for number, frame in enumerate(frames):
        path = folder / f"slot-{number}.bin"
        np.ascontiguousarray(frame).view(np.uint8).tofile(path)
        view = frame_view(np.memmap(path, np.uint8, "r"), frame.shape, frame.dtype)
        leased.append(np.asarray(SlotLease(view, str(path), lambda: None)))
    return leased


def _bare_process(
    integration: IntegrationConfig,
    grid: QGrid,
    frames_file: str,
    n: int,
    start: multiprocessing.synchronize.Barrier,
    seconds: multiprocessing.queues.Queue,
) -> None:
    """One bare process: load the frames, build the engine, wait for the others, time ``n``
    frames of :func:`bare_pyfai_loop`."""
    frames = list(np.load(frames_file, allow_pickle=False))
    single = integration.model_copy(update={"openmp_threads": 1})
    integrator = LineOutIntegrator(single, grid)
    integrator.integrate(frames[0])  # the engine, and the thread's OpenMP limit
    run = bare_pyfai_loop(integrator, [frames[i % len(frames)] for i in range(n)])
    start.wait()
    began = time.perf_counter()
    run()
    seconds.put(time.perf_counter() - began)


def bare_rate(
    integration: IntegrationConfig, grid: QGrid, frames_file: Path, processes: int, n: int
) -> float:
    """Frames per second of ``processes`` bare pyFAI loops of ``n`` frames each, together."""
    context = multiprocessing.get_context("spawn")
    start, seconds = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(
            target=_bare_process, args=(integration, grid, str(frames_file), n, start, seconds)
        )
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    slowest = max(seconds.get(timeout=600) for _ in workers)
    for worker in workers:
        worker.join()
    return processes * n / slowest


def pool_rate(
    integration: IntegrationConfig,
    grid: QGrid,
    frames: list[np.ndarray] | list[EncodedFrame],
    processes: int,
    n: int,
) -> float:
    """Frames per second through an :class:`IntegratorPool` of ``processes``, ``n`` frames
    handed over as fast as it takes them (its engines built before timing)."""
    with IntegratorPool(integration, grid, processes) as pool:
        pool.wait_ready(timeout_s=120)
        began = time.perf_counter()
        done = 0
        for key in range(n):
            while not pool.has_room:
                done += len(pool.wait_any(timeout_s=1.0))
            pool.submit(key, frames[key % len(frames)])
        done += len(pool.wait_all(timeout_s=600))
        elapsed = time.perf_counter() - began
    assert done == n, (done, n)
    return n / elapsed


def feeder_rate(
    integrator: LineOutIntegrator, frames: list[np.ndarray] | list[EncodedFrame], n: int
) -> float:
    """Frames per second of the feeder's own engine, ``n`` frames (its engine built),
    each decoded first where it is compressed."""

    def frame(key: int) -> np.ndarray:
        given = frames[key % len(frames)]
        return given.decode() if isinstance(given, EncodedFrame) else given

    integrator.integrate(frame(0))
    began = time.perf_counter()
    for key in range(n):
        integrator.integrate(frame(key))
    return n / (time.perf_counter() - began)


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": float(np.median(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
    }


def _ratio(over: list[float], under: list[float]) -> dict[str, float]:
    """Statistics of the ratios of the paired runs of two cases."""
    return _stats([a / b for a, b in zip(over, under, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=96, help="frames per process and run")
    parser.add_argument(
        "--read-ahead-frames", type=int, default=2000, help="frames per process, read ahead"
    )
    parser.add_argument("--distinct", type=int, default=8, help="distinct simulated frames")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    counts = list(range(1, max(2, args.max_processes) + 1))
    figures: dict[str, dict[str, list[float]]] = {
        region: {f"{case}_{k}": [] for case in ("bare", "pool") for k in counts} | {"feeder": []}
        for region in ("sector", "full_ring", "sector_lut")
    }
    compressed: dict[str, list[float]] = {f"pool_{k}": [] for k in counts} | {"feeder": []}
    read_ahead: dict[str, list[float]] = {f"pool_{k}": [] for k in counts}
    with (
        tempfile.TemporaryDirectory() as name,
        tempfile.TemporaryDirectory(dir=shared_memory_folder()) as slots,
    ):
        folder = Path(name)
        sector, instrument, frames = eiger_frames(folder, args.distinct)
        settings = {
            "sector": sector,
            "full_ring": sector.model_copy(update={"azimuth_range_deg": None}),
            "sector_lut": sector.model_copy(update={"method": "lut"}),
        }
        frames_file = folder / "frames.npy"
        np.save(frames_file, np.stack(frames))
        grid = instrument.grid
        own = {
            region: LineOutIntegrator(integration, grid) for region, integration in settings.items()
        }
        encoded = [stream_encoded(frame) for frame in frames]
        in_slots = in_slot_files(frames, Path(slots))
        for _ in range(args.repeats):
            for k in counts:
                read_ahead[f"pool_{k}"].append(
                    pool_rate(sector, grid, in_slots, k, args.read_ahead_frames * k)
                )
                print(
                    f"sector, frames read ahead, {k} processes: pool "
                    f"{read_ahead[f'pool_{k}'][-1]:.1f}/s",
                    flush=True,
                )
            compressed["feeder"].append(feeder_rate(own["sector"], encoded, args.frames))
            for k in counts:
                compressed[f"pool_{k}"].append(pool_rate(sector, grid, encoded, k, args.frames * k))
                print(
                    f"sector, bitshuffle-LZ4 frames, {k} processes: pool "
                    f"{compressed[f'pool_{k}'][-1]:.1f}/s (feeder's engine, decoding "
                    f"{compressed['feeder'][-1]:.1f}/s)",
                    flush=True,
                )
            for region, integration in settings.items():
                found = figures[region]
                found["feeder"].append(feeder_rate(own[region], frames, args.frames))
                for k in counts:
                    found[f"bare_{k}"].append(
                        bare_rate(integration, grid, frames_file, k, args.frames)
                    )
                    found[f"pool_{k}"].append(
                        pool_rate(integration, grid, frames, k, args.frames * k)
                    )
                    print(
                        f"{region}, {k} processes: bare pyFAI {found[f'bare_{k}'][-1]:.1f}/s, "
                        f"pool {found[f'pool_{k}'][-1]:.1f}/s (feeder's engine "
                        f"{found['feeder'][-1]:.1f}/s)",
                        flush=True,
                    )
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"}
        | {"frame_shape": list(frames[0].shape), "frame_dtype": str(frames[0].dtype)},
        "targets": {"pool_2_over_1_min": 1.6},
        "regions": {
            region: {
                "pixels": own[region].csr.n_pixels if own[region].csr is not None else None,
                "feeder_engine_per_s": _stats(found["feeder"]),
                "feeder_engine_over_bare_1": _ratio(found["feeder"], found["bare_1"]),
                "processes": {
                    str(k): {
                        "bare_pyfai_per_s": _stats(found[f"bare_{k}"]),
                        "pool_per_s": _stats(found[f"pool_{k}"]),
                        "pool_over_bare": _ratio(found[f"pool_{k}"], found[f"bare_{k}"]),
                        "pool_over_pool_1": _ratio(found[f"pool_{k}"], found["pool_1"]),
                        "bare_over_bare_1": _ratio(found[f"bare_{k}"], found["bare_1"]),
                    }
                    for k in counts
                },
            }
            for region, found in figures.items()
        },
        "sector_read_ahead": {
            "processes": {
                str(k): {
                    "pool_per_s": _stats(read_ahead[f"pool_{k}"]),
                    "pool_over_pool_1": _ratio(read_ahead[f"pool_{k}"], read_ahead["pool_1"]),
                }
                for k in counts
            },
        },
        "sector_bitshuffle_lz4": {
            "compressed_mb_per_frame": float(np.mean([len(e.data) for e in encoded]) / 1e6),
            "decoded_mb_per_frame": frames[0].nbytes / 1e6,
            "feeder_engine_decoding_per_s": _stats(compressed["feeder"]),
            "processes": {
                str(k): {
                    "pool_per_s": _stats(compressed[f"pool_{k}"]),
                    "pool_over_pool_1": _ratio(compressed[f"pool_{k}"], compressed["pool_1"]),
                    "pool_over_feeder_engine": _ratio(
                        compressed[f"pool_{k}"], compressed["feeder"]
                    ),
                }
                for k in counts
            },
        },
    }
    args.out.parent.mkdir(exist_ok=True)
    save(args.out, report)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
