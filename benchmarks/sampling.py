"""Time for 1,000 posterior samples of one exposure on one CPU thread: eager and compiled.

The posterior-model issue's target is 5 ms. Measured side by side in one process, on the same
line-out and seeds, for each model file given (default: the shipped model):

- ``eager``: :meth:`PosteriorModel.sample` as the library runs it (counts from numpy in,
  samples to numpy out, input checks included);
- ``compiled``: the same ``sample_tensor`` compiled once with ``torch.compile`` (inductor,
  C++ kernels; needs a C compiler), with its compile time (cold: the first compilation in
  a fresh cache; warm: inductor's on-disk cache is reused by later processes) and the
  largest difference of its draws from the eager ones, per parameter, in units of the
  posterior sd (same seed, same draws up to floating-point reordering).

Both are measured twice, each time in a fresh process: with glibc's malloc defaults, and
with :func:`~pipeline.model.allocator.retain_freed_memory` as the inference workers run (freed
tensors stay in the process; with the defaults each batch page-faults fresh memory, and how
much depends on the heap's history, which made timings here drift by up to 2x between
processes). Each figure is the median of ``--repeats`` timings, with the 10th and 90th
percentiles.

Run: ``python -m benchmarks.sampling [MODEL...] [--repeats 200]``
(results in ``benchmarks/results/sampling.json``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import save
from pipeline.bundled import DEFAULT_MODEL
from pipeline.model import load
from pipeline.model.allocator import retain_freed_memory
from pipeline.physics import simulate

RESULTS = Path(__file__).parent / "results" / "sampling.json"


def _timings_ms(run: Callable[[], object], repeats: int) -> dict:
    for _ in range(10):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(1e3 * (time.perf_counter() - start))
    p10, median, p90 = np.percentile(times, [10, 50, 90])
    return {"median": round(median, 2), "p10": round(p10, 2), "p90": round(p90, 2)}


def measure(path: Path, repeats: int) -> dict:
    model = load(path, device="cpu")
    _, counts = simulate(1, np.random.default_rng(7), model.prior, model.grid)
    tensor = torch.from_numpy(counts.astype(np.float32))
    generator = torch.Generator()
    with torch.inference_mode():
        eager = _timings_ms(lambda: model.sample(counts, 1000, seed=0), repeats)
        start = time.perf_counter()
        compiled = torch.compile(model.sample_tensor)
        draws = compiled(tensor, 1000, generator.manual_seed(0))
        compile_s = time.perf_counter() - start
        reference = model.sample_tensor(tensor, 1000, generator.manual_seed(0))
        spread = reference.std(dim=1, keepdim=True)
        difference = ((draws - reference).abs() / spread).amax(dim=(0, 1))
        fast = _timings_ms(lambda: compiled(tensor, 1000, generator), repeats)
    architecture = model.architecture
    return {
        "file": str(path),
        "architecture": {
            key: getattr(architecture, key)
            for key in ("n_blocks", "hidden", "activation", "conditional_affine")
        },
        "eager_ms": eager,
        "compiled_ms": fast,
        "compile_s": round(compile_s, 1),
        "compiled_vs_eager_largest_difference_in_posterior_sd": dict(
            zip(model.parameter_names, (round(float(d), 5) for d in difference), strict=True)
        ),
    }


def _measure_in_fresh_process(path: Path, repeats: int, retain: bool) -> dict:
    torch.set_num_threads(1)
    if retain:
        retain_freed_memory()
    return measure(path, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", type=Path, default=[DEFAULT_MODEL])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    models: dict[str, dict] = {}
    for path in args.models:
        for setting, retain in (("glibc_defaults", False), ("retain_freed_memory", True)):
            with spawn.Pool(1) as pool:
                result = pool.apply(_measure_in_fresh_process, (path, args.repeats, retain))
            models.setdefault(path.stem, {})[setting] = result
    report = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
        "target_ms": 5.0,
        "models": models,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    save(RESULTS, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
