"""What compressing the posterior samples costs and saves in the results file (issue: results
store), side by side in one run.

Real posterior samples (the shipped model, 1,000 per exposure, of simulated line-outs) are
appended one exposure at a time and flushed, as the writer does, into a ``samples`` dataset
chunked per exposure, with each filter: none, gzip (level 4, with byte shuffle), Zstd
(hdf5plugin, level 3, with byte shuffle), bitshuffle + LZ4 (hdf5plugin). Reported per filter:
write time per exposure (median of ``--repeats``), bytes per exposure, and the time to read
every exposure back.

Run: ``python -m benchmarks.store [--exposures 200] [--repeats 3]``
(results in ``benchmarks/results/store.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import torch

from benchmarks.report import save
from pipeline.model import load
from pipeline.physics import simulate

RESULTS = Path(__file__).parent / "results" / "store.json"
FILTERS: dict[str, dict] = {
    "none": {},
    "gzip_4_shuffle": {"compression": "gzip", "compression_opts": 4, "shuffle": True},
    "zstd_3_shuffle": {**hdf5plugin.Zstd(clevel=3), "shuffle": True},
    "bitshuffle_lz4": dict(hdf5plugin.Bitshuffle(cname="lz4")),
}


def posterior_samples(n: int) -> np.ndarray:
    """(n, 1000, 5) float32 draws of the shipped model for simulated line-outs."""
    torch.set_num_threads(1)
    model = load(device="cpu")
    _, counts = simulate(n, np.random.default_rng(3), model.prior, model.grid)
    return np.concatenate(
        [model.sample(counts[i : i + 8], 1000, seed=i) for i in range(0, n, 8)]
    ).astype(np.float32)


def write_and_read(samples: np.ndarray, folder: Path, name: str) -> tuple[float, float, float]:
    """Seconds per exposure to append + flush, bytes per exposure, seconds to read all."""
    path = folder / f"{name}-{time.monotonic_ns()}.h5"
    shape = samples.shape[1:]
    with h5py.File(path, "w", libver="latest") as handle:
        dataset = handle.create_dataset(
            "samples",
            shape=(0, *shape),
            maxshape=(None, *shape),
            chunks=(1, *shape),
            dtype=np.float32,
            **FILTERS[name],
        )
        handle.swmr_mode = True
        start = time.perf_counter()
        for row, draws in enumerate(samples):
            dataset.resize(row + 1, axis=0)
            dataset[row] = draws
            handle.flush()
        write_s = (time.perf_counter() - start) / len(samples)
        stored = dataset.id.get_storage_size() / len(samples)
    start = time.perf_counter()
    with h5py.File(path, "r") as handle:
        back = handle["samples"][()]
    read_s = time.perf_counter() - start
    if not np.array_equal(back, samples):
        raise AssertionError(f"{name}: samples read back differ")
    return write_s, stored, read_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exposures", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    samples = posterior_samples(args.exposures)
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in FILTERS}
    with tempfile.TemporaryDirectory() as name:
        for _ in range(args.repeats):
            for filter_name in FILTERS:
                runs[filter_name].append(write_and_read(samples, Path(name), filter_name))
    raw = samples[0].nbytes
    report = {
        "machine": {"platform": platform.platform(), "h5py": h5py.__version__},
        "exposures": args.exposures,
        "samples_per_exposure": samples.shape[1],
        "raw_bytes_per_exposure": raw,
        "filters": {
            name: {
                "write_ms_per_exposure": round(1e3 * float(np.median([r[0] for r in rows])), 3),
                "bytes_per_exposure": round(float(np.median([r[1] for r in rows]))),
                "ratio": round(raw / float(np.median([r[1] for r in rows])), 3),
                "read_all_s": round(float(np.median([r[2] for r in rows])), 4),
            }
            for name, rows in runs.items()
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    save(RESULTS, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
