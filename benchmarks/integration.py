"""Integration and reading costs per frame, side by side in one run (issue: detector ingestion).

Three measurements, each as a ratio of two loops over the same frames in the same process:

1. **integration**: :meth:`LineOutIntegrator.integrate` against a bare pyFAI ``integrate1d``
   loop with the same engine and options (no pixel splitting, CSR, Cython, mask, bad-pixel
   dummies, 512 bins), on the real Pilatus 1M frame of ``../shared/data`` (Poisson
   resamplings of it) with its v1 PONI, for a +-10 degree sector and the full ring;
2. **reading**: frames read from files and integrated, against integration of the same frames
   already in memory: Pilatus 1M CBF files (fabio) and an Eiger 4M bitshuffle-LZ4 HDF5 data
   file (h5py + hdf5plugin), through the project's sources, read in the integrating process
   and read ahead by a reader process (:class:`~pipeline.sources.readahead.ReadAhead`). Per
   frame from the first exposure's arrival to the last one integrated (the reader process's
   start-up and shut-down, once per scan, are reported beside it);
3. **memory**: resident memory (and its peak, VmHWM) of a fresh process holding one
   integrator with its engine built, full ring, for the Pilatus 1M and the Eiger 4M
   geometries (the process's own baseline after imports is reported beside it).

Run: ``python -m benchmarks.integration [--frames 30] [--out benchmarks/results/integration.json]``.
The Pilatus figures need ``../shared/data``; without it they are skipped and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import fabio
import h5py
import hdf5plugin
import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.report import save
from pipeline.config import IntegrationConfig
from pipeline.integration import DEFAULT_PONI, LineOutIntegrator
from pipeline.physics import QGrid
from pipeline.sources.base import NumberedFrames
from pipeline.sources.readahead import ReadAhead

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PILATUS_FRAME, PILATUS_PONI = SHARED / "CeO2_Pilatus1M.tif", SHARED / "CeO2_Pilatus1M.poni"
#: The real frame is wide-angle (CeO2 rings): integrate it on a grid its pixels cover.
WIDE_GRID = QGrid(q_min_nm=5.0, q_max_nm=45.0, n_points=512)


def _median_ms(run: Callable[[], None], frames: int, repeats: int) -> float:
    """Median over ``repeats`` of the time per frame (ms) of ``run`` (which does ``frames``)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) / frames)
    return 1e3 * float(np.median(times))


def bare_pyfai_loop(integrator: LineOutIntegrator, frames: list[np.ndarray]) -> Callable[[], None]:
    """pyFAI alone, with the options :class:`LineOutIntegrator` passes: its mask (the pixels
    outside the q grid left out, as the engine it built was given; another mask makes pyFAI
    build a new engine, seconds for an Eiger 4M) and the frame's bad-pixel marker."""
    config, grid = integrator.config, integrator.grid
    geometry = integrator.geometry
    dummy, delta_dummy = integrator.dummy(frames[0]) or (None, None)

    def run() -> None:
        for frame in frames:
            geometry.integrate1d(
                frame,
                grid.n_points,
                unit="q_nm^-1",
                radial_range=grid.radial_range_nm,
                azimuth_range=config.azimuth_range_deg,
                mask=integrator.binning_mask,
                dummy=dummy,
                delta_dummy=delta_dummy,
                correctSolidAngle=False,
                polarization_factor=None,
                method=("no", config.method, "cython"),
            )

    return run


def _ours_loop(integrator: LineOutIntegrator, frames: Iterable[np.ndarray]) -> Callable[[], None]:
    frames = list(frames)

    def run() -> None:
        for frame in frames:
            integrator.integrate(frame)

    return run


def integration_ratios(n_frames: int, repeats: int) -> dict:
    """Our integrator against bare pyFAI on Pilatus 1M frames, sector and full ring."""
    if not PILATUS_FRAME.is_file():
        return {"skipped": f"{SHARED} absent"}
    real = fabio.open(str(PILATUS_FRAME)).data
    rng = np.random.default_rng(0)
    frames = [
        np.where(real >= 0, rng.poisson(np.maximum(real, 0)), real).astype(np.int32)
        for _ in range(n_frames)
    ]
    out = {}
    for label, sector in (("sector_20deg", (-10.0, 10.0)), ("full_ring", None)):
        config = IntegrationConfig(poni=PILATUS_PONI, azimuth_range_deg=sector)
        integrator = LineOutIntegrator(config, WIDE_GRID)
        integrator.integrate(frames[0])  # builds the engine
        bare = _median_ms(bare_pyfai_loop(integrator, frames), n_frames, repeats)
        ours = _median_ms(_ours_loop(integrator, frames), n_frames, repeats)
        out[label] = {
            "bare_pyfai_ms": round(bare, 2),
            "line_out_integrator_ms": round(ours, 2),
            "ratio": round(ours / bare, 3),
            "target_ratio_max": 1.2,
        }
    return out


def reading_ratios(n_frames: int, repeats: int) -> dict:
    """Read + integrate against integrate only: Pilatus CBF files and Eiger 4M bslz4 HDF5."""
    from pipeline.sources.eiger import EigerSource
    from pipeline.sources.files import FileSource

    out: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if PILATUS_FRAME.is_file():
            real = fabio.open(str(PILATUS_FRAME)).data
            rng = np.random.default_rng(1)
            frames = [
                np.where(real >= 0, rng.poisson(np.maximum(real, 0)), real).astype(np.int32)
                for _ in range(n_frames)
            ]
            paths = []
            for number, frame in enumerate(frames):
                path = folder / f"pilatus_{number:05d}.cbf"
                fabio.cbfimage.CbfImage(data=frame).write(str(path))
                paths.append(path)
            integrator = LineOutIntegrator(
                IntegrationConfig(poni=PILATUS_PONI, azimuth_range_deg=(-10.0, 10.0)), WIDE_GRID
            )
            integrator.integrate(frames[0])
            out["pilatus_1m_cbf"] = _reading_entry(
                integrator, frames, lambda: FileSource(paths, "bench"), repeats
            )
        else:
            out["pilatus_1m_cbf"] = {"skipped": f"{SHARED} absent"}

        integrator = LineOutIntegrator(IntegrationConfig(), QGrid())
        rng = np.random.default_rng(2)
        frames = [rng.poisson(0.05, integrator.shape).astype(np.uint32) for _ in range(n_frames)]
        data_file = folder / "eiger_data_000001.h5"
        with h5py.File(data_file, "w") as handle:
            handle.create_dataset(
                "entry/data/data",
                data=np.stack(frames),
                chunks=(1, *integrator.shape),
                **hdf5plugin.Bitshuffle(cname="lz4"),
            )
        integrator.integrate(frames[0])
        out["eiger_4m_bslz4_hdf5"] = _reading_entry(
            integrator, frames, lambda: EigerSource([data_file], "bench"), repeats
        )
        out["eiger_4m_bslz4_hdf5"]["file_mb_per_frame"] = round(
            data_file.stat().st_size / n_frames / 1e6, 3
        )
    return out


def _reading_entry(
    integrator: LineOutIntegrator,
    frames: list[np.ndarray],
    source: Callable[[], NumberedFrames],
    repeats: int,
) -> dict:
    """Integration in memory against reading + integration, in process and read ahead."""
    in_memory = _median_ms(_ours_loop(integrator, frames), len(frames), repeats)
    entry: dict = {"integrate_in_memory_ms": round(in_memory, 2)}
    # as reprocess-scan does: beside a reader process, pyFAI's engine leaves it a core
    threads = max(1, (os.cpu_count() or 1) - 1)
    for label, exposures, openmp_threads in (
        ("in_process", lambda: source().exposures(), None),
        ("read_ahead", lambda: ReadAhead(source()).exposures(), threads),
    ):
        per_frame, start_up, wind_down = [], [], []
        with threadpool_limits(limits=openmp_threads, user_api="openmp"):
            _time_reading(exposures, integrator, repeats, per_frame, start_up, wind_down)
        median = 1e3 * float(np.median(per_frame))
        entry[label] = {
            "read_and_integrate_ms": round(median, 2),
            "reading_overhead": round(median / in_memory - 1.0, 3),
            "first_frame_after_ms": round(1e3 * float(np.median(start_up)), 1),
            "end_after_last_frame_ms": round(1e3 * float(np.median(wind_down)), 1),
            "openmp_threads": openmp_threads or "default",
        }
    entry["target_overhead_max"] = 0.2
    return entry


def _time_reading(
    exposures: Callable[[], Iterable],
    integrator: LineOutIntegrator,
    repeats: int,
    per_frame: list[float],
    start_up: list[float],
    wind_down: list[float],
) -> None:
    """Per frame from the first exposure's arrival to the last one integrated; before and
    after that, once per pass."""
    for _ in range(repeats):
        start = time.perf_counter()
        first = last = 0.0
        n_frames = 0
        for exposure in exposures():
            if exposure.error:
                raise RuntimeError(exposure.error)
            if n_frames == 0:
                first = time.perf_counter()
            integrator.integrate(exposure.frame)
            last = time.perf_counter()
            n_frames += 1
        end = time.perf_counter()
        per_frame.append((last - first) / (n_frames - 1))
        start_up.append(first - start)
        wind_down.append(end - last)


MEMORY_PROBE = """
import sys
from pathlib import Path
import numpy as np
from pipeline.config import IntegrationConfig
from pipeline.integration import LineOutIntegrator
from pipeline.physics import QGrid
from pipeline.sources.base import NumberedFrames
from pipeline.sources.readahead import ReadAhead

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
poni = None if sys.argv[1] == "-" else Path(sys.argv[1])
grid = QGrid() if poni is None else QGrid(q_min_nm=5.0, q_max_nm=45.0, n_points=512)
before = status_mb("VmRSS")
integrator = LineOutIntegrator(IntegrationConfig(poni=poni, azimuth_range_deg=None), grid)
shape = integrator.shape or (1043, 981)
integrator.integrate(np.ones(shape, np.int32))
print(before, status_mb("VmRSS"), status_mb("VmHWM"))
"""


def memory() -> dict:
    """Resident memory of one integrator process (engine built, full ring)."""
    out = {}
    cases = [("eiger_4m", "-")]
    if PILATUS_PONI.is_file():
        cases.insert(0, ("pilatus_1m", str(PILATUS_PONI)))
    for label, poni in cases:
        result = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, poni], capture_output=True, text=True, check=True
        )
        before, after, peak = map(float, result.stdout.split()[-3:])
        out[label] = {
            "rss_after_imports_mb": round(before),
            "rss_with_integrator_mb": round(after),
            "peak_rss_mb": round(peak),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "integration.json"
    )
    args = parser.parse_args()
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.node()}",
        "frames": args.frames,
        "repeats": args.repeats,
        "integration": integration_ratios(args.frames, args.repeats),
        "reading": reading_ratios(args.frames, args.repeats),
        "memory": memory(),
        "default_geometry": str(DEFAULT_PONI.name),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
