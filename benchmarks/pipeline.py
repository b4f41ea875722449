"""The whole pipeline against the integration limit, and its latency at fixed input rates
(issue: benchmarks), side by side in one run on the same frames and cores.

For each detector, with the bundled model trained for it (a model takes line-outs of its own
instrument's geometry only), frames simulated for that instrument: an Eiger 4M at 5 m, sector
chi = 0 +- 5 degrees, 512 bins (the default model, ``grating-cinn``), and a Pilatus 1M at 5 m,
sector +- 5 degrees, 384 bins (``pilatus1m-5m-sector``):

1. **integration limit**: bare pyFAI ``integrate1d`` loops over the frames, with the options
   the pipeline's integrator passes (CSR, no pixel splitting, the model's bins, its mask),
   in as many processes as the machine has cores, started together
   (:func:`benchmarks.integrators.bare_rate`): pyFAI alone on the same cores;
2. **pipeline**: the same frames through :class:`~workers.feeder.Feeder` (``--integrators``
   engines, by default the pipeline's own choice: for the ``csr`` method one, in the feeder,
   which applies pyFAI's CSR matrix to the pixels it names; 2 inference workers drawing
   1,000 posterior samples each; the writer's HDF5 file), fed as fast as they go in batches
   of 16, from the first frame handed over to the last exposure written. The ratio pipeline /
   limit is the figure (target >= 0.8);
3. **latency**: frames handed over at a fixed rate (10 Hz, 90% of the pipeline's rate
   from 2., and the rates of ``--rate-hz``), each timed from the moment it is handed over
   (before integration) to the writer's acknowledgement that it is in the file: p50, p99,
   max (target p99 <= 50 ms at 10 Hz on 2 cores).

With ``--integrate-on-workers`` the inference workers integrate the frames on their own
device (the GPU mode); with ``--compressed`` the frames are handed over bitshuffle-LZ4
compressed, as a DECTRIS stream leaves them (decoded by whoever integrates them).

Frames are simulated once and reused (an Eiger 4M frame is 18 MB), handed over under new
exposure indices. Each figure is the median of ``--repeats`` runs, with min and max.

Run: ``python -m benchmarks.pipeline [--frames 96] [--repeats 3] [--latency-s 10]``
(results in ``benchmarks/results/pipeline.json``, plot ``benchmarks/results/pipeline_latency.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import bitshuffle
import numpy as np

from benchmarks.integrators import bare_rate
from benchmarks.report import save
from flows.scan import simulated_integration
from pipeline.config import InferenceConfig, IntegrationConfig, PipelineConfig
from pipeline.exposure import Exposure
from pipeline.instrument import Instrument
from pipeline.model.checkpoint import card_instrument, read_card
from pipeline.preflight import settings_for_model
from pipeline.sources import SimulatedDetector
from pipeline.sources.compression import EncodedFrame
from workers.feeder import Feeder, RecentResult

RESULTS = Path(__file__).parent / "results" / "pipeline.json"
PLOT = Path(__file__).parent / "results" / "pipeline_latency.png"
BATCH = 16


@dataclass(frozen=True)
class Detector:
    """A detector as benchmarked: its integration settings and the model trained for it."""

    integration: IntegrationConfig
    #: a bundled model's name (``None``: the default model)
    model: str | None
    instrument: Instrument


def detectors(folder: Path) -> dict[str, Detector]:
    """The benchmarked detectors, each with the geometry and sector of its model's instrument
    (its PONI written to ``folder``)."""
    found = {}
    for name, model in (("eiger4m", None), ("pilatus1m", "pilatus1m-5m-sector")):
        instrument = card_instrument(read_card(model))
        found[name] = Detector(simulated_integration(instrument, folder), model, instrument)
    return found


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": float(np.median(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
    }


def integration_limit(detector: Detector, frames_file: Path, n: int) -> float:
    """Frames per second of bare pyFAI loops on every core, ``n`` frames in all (their
    engines built before timing)."""
    cores = os.cpu_count() or 1
    return bare_rate(
        detector.integration, detector.instrument.grid, frames_file, cores, max(1, n // cores)
    )


@dataclass(frozen=True)
class Setup:
    """How the pipeline runs: its pyFAI engines (``n_integrators``; ``None``: its own
    choice), compiled samplers, and whether the inference workers integrate
    (``integrate_on_workers``, the GPU mode)."""

    integrators: int | None = None
    compiled: bool = False
    on_workers: bool = False

    def config(self, detector: Detector, folder: Path, name: str) -> PipelineConfig:
        """A scan's configuration for ``detector``, named ``name`` and a clock reading."""
        config = PipelineConfig(
            scan_id=f"{name}-{time.monotonic_ns()}",
            output_dir=folder,
            n_integrators=self.integrators,
            integrate_on_workers=self.on_workers,
            integration=detector.integration,
            inference=InferenceConfig(compile=self.compiled, model=detector.model),
        )
        return settings_for_model(config)  # the model's grid


def _exposure(scan_id: str, index: int, frames: list[np.ndarray | EncodedFrame]) -> Exposure:
    frame = frames[index % len(frames)]
    if isinstance(frame, EncodedFrame):  # as a stream leaves it
        return Exposure(scan_id, index, time.time(), None, encoded=frame)
    return Exposure(scan_id, index, time.time(), frame)


def bslz4(frame: np.ndarray) -> EncodedFrame:
    """``frame`` compressed as a DECTRIS stream sends it (bitshuffle-LZ4, no header)."""
    blob = bitshuffle.compress_lz4(np.ascontiguousarray(frame)).tobytes()
    return EncodedFrame(blob, frame.shape, frame.dtype.str, "bslz4", frame.itemsize, "auto")


def pipeline_rate(
    detector: Detector,
    frames: list[np.ndarray | EncodedFrame],
    n: int,
    folder: Path,
    setup: Setup,
) -> float:
    """Exposures per second through the pipeline, first frame handed over to last written."""
    config = setup.config(detector, folder, "rate")
    with Feeder(config) as feeder:
        start = time.perf_counter()
        for first in range(0, n, BATCH):
            for index in range(first, min(n, first + BATCH)):
                feeder.submit(_exposure(config.scan_id, index, frames))
            feeder.collect()
        summary = feeder.wait()
        elapsed = time.perf_counter() - start
    assert summary.written_ok == n, summary
    return n / elapsed


def latency_at(
    detector: Detector,
    frames: list[np.ndarray | EncodedFrame],
    rate_hz: float,
    duration_s: float,
    folder: Path,
    setup: Setup,
) -> np.ndarray:
    """Milliseconds from hand-over to written of each frame handed over at ``rate_hz``."""
    handed: dict[int, float] = {}
    written: dict[int, float] = {}

    def on_result(result: RecentResult) -> None:
        written[result.index] = time.perf_counter()

    config = setup.config(detector, folder, "latency")
    n = max(1, round(rate_hz * duration_s))
    with Feeder(config, on_result=on_result) as feeder:
        start = time.perf_counter()
        for index in range(n):
            due = start + index / rate_hz
            while (wait := due - time.perf_counter()) > 0:
                feeder.collect(timeout_ms=max(1, int(wait * 1e3)))
            handed[index] = time.perf_counter()
            feeder.submit(_exposure(config.scan_id, index, frames))
            feeder.collect()
        feeder.wait()
    return np.array([1e3 * (written[i] - handed[i]) for i in range(n)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=96, help="exposures per throughput run")
    parser.add_argument("--distinct", type=int, default=16, help="distinct simulated frames")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-s", type=float, default=10.0, help="seconds per latency run")
    parser.add_argument("--detectors", nargs="+", default=["eiger4m", "pilatus1m"])
    parser.add_argument(
        "--compile",
        action="store_true",
        help="workers compile their sampler (11-22 s per worker start, not timed)",
    )
    parser.add_argument(
        "--integrators",
        type=int,
        default=None,
        help="the pipeline's pyFAI engines (n_integrators; default: the pipeline's own choice, "
        "1 for the csr method, its engine in the feeder)",
    )
    parser.add_argument(
        "--integrate-on-workers",
        action="store_true",
        help="the GPU mode: the inference workers integrate the frames on their device",
    )
    parser.add_argument(
        "--compressed",
        action="store_true",
        help="hand the frames over bitshuffle-LZ4 compressed, as a DECTRIS stream leaves them",
    )
    parser.add_argument(
        "--rate-hz",
        type=float,
        nargs="*",
        default=[],
        help="more input rates to measure the latency at (e.g. 560: an EIGER2 X 4M's highest)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"}
        | {
            "workers": 2,
            "samples_per_exposure": 1000,
            "batch": BATCH,
            "limit_processes": os.cpu_count(),
        },
        "targets": {"pipeline_over_limit_min": 0.8, "p99_at_10_hz_max_ms": 50.0},
        "detectors": {},
    }
    latencies: dict[str, dict[str, np.ndarray]] = {}
    setup = Setup(args.integrators, args.compile, args.integrate_on_workers)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        for name, detector in detectors(folder).items():
            if name not in args.detectors:
                continue
            simulator = SimulatedDetector(detector.integration, detector.instrument, seed=1)
            decoded = [e.frame for e in simulator.scan(name, args.distinct).exposures()]
            frames_file = folder / f"{name}-frames.npy"
            np.save(frames_file, np.stack(decoded))
            frames = [bslz4(f) if args.compressed else f for f in decoded]
            limits, rates = [], []
            for _ in range(args.repeats):  # alternating, so that drifts hit both alike
                limits.append(integration_limit(detector, frames_file, args.frames))
                rates.append(pipeline_rate(detector, frames, args.frames, folder, setup))
                print(f"{name}: limit {limits[-1]:.1f}/s, pipeline {rates[-1]:.1f}/s", flush=True)
            ratios = [rate / limit for rate, limit in zip(rates, limits, strict=True)]
            sustained = 0.9 * float(np.median(rates))
            entry = {
                "frame_shape": list(decoded[0].shape),
                "integration_limit_per_s": _stats(limits),
                "pipeline_per_s": _stats(rates),
                "pipeline_over_limit": _stats(ratios),
                "latency_ms": {},
            }
            latencies[name] = {}
            rates_hz = [("10_hz", 10.0), ("sustained", sustained)]
            rates_hz += [(f"{rate:g}_hz", rate) for rate in args.rate_hz]
            for label, rate in rates_hz:
                runs = [
                    latency_at(detector, frames, rate, args.latency_s, folder, setup)
                    for _ in range(args.repeats)
                ]
                latencies[name][label] = np.concatenate(runs)
                entry["latency_ms"][label] = {
                    "rate_hz": rate,
                    "p50": _stats([float(np.percentile(r, 50)) for r in runs]),
                    "p99": _stats([float(np.percentile(r, 99)) for r in runs]),
                    "max": _stats([float(r.max()) for r in runs]),
                    "exposures_per_run": len(runs[0]),
                }
                print(f"{name} {label} ({rate:.1f} Hz): {entry['latency_ms'][label]}", flush=True)
            report["detectors"][name] = entry
    args.out.parent.mkdir(exist_ok=True)
    save(args.out, report)
    if args.out == RESULTS:
        plot(latencies, PLOT)
    print(json.dumps(report, indent=2, default=str))


def plot(latencies: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """Latency distributions per detector and rate (log-spaced histogram)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.5 * max(1, len(latencies))))
    FigureCanvasAgg(figure)
    for row, (detector, runs) in enumerate(latencies.items()):
        axis = figure.add_subplot(len(latencies), 1, row + 1)
        values = np.concatenate(list(runs.values()))
        bins = np.geomspace(max(1.0, values.min() * 0.9), values.max() * 1.1, 40)
        for label, data in runs.items():
            axis.hist(
                data, bins=bins, alpha=0.6, label=f"{label}: p99 {np.percentile(data, 99):.0f} ms"
            )
        axis.axvline(100.0, color="k", ls="--", lw=0.8, label="100 ms")
        axis.set(xscale="log", xlabel="frame handed over -> written (ms)", ylabel="exposures")
        axis.set_title(detector)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
