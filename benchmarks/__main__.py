"""``python -m benchmarks run [--quick] [--gpu]``: every benchmark, one after another, each in
a fresh process on the same machine, then the generated summary of ``docs/performance.md``.

``--quick`` (under 10 minutes on 2 cores) runs fewer frames and repeats; the full run takes
about half an hour. ``--gpu`` adds, when CUDA is present, the GPU throughput
(``benchmarks.device_inference``) and the GPU mode through the whole pipeline
(``pipeline_gpu_mode``: Eiger 4M frames as a stream sends them, integrated by the GPU
workers, latency at 560 Hz among its rates); otherwise the summary says they were not
measured here. A benchmark that fails
is reported and the others go on; the command then exits 1.

The results: ``benchmarks/results/*.json`` (one per benchmark, with the machine), PNG plots
beside them, ``benchmarks/results/run.json`` (what ran, how long, whether it passed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from benchmarks.report import RESULTS, update

#: name: (quick arguments, full arguments); each is ``python -m benchmarks.NAME ARGS``
STEPS: dict[str, tuple[list[str], list[str]]] = {
    "pipeline": (
        ["--frames", "48", "--repeats", "2", "--latency-s", "4"],
        ["--frames", "96", "--repeats", "3", "--latency-s", "10"],
    ),
    "scaling": (["--repeats", "3", "--max-samples", "10000"], ["--repeats", "5"]),
    "sampling": (["--repeats", "50"], ["--repeats", "200"]),
    "transport": (["--exposures", "100", "--repeats", "2"], ["--exposures", "300"]),
    "orchestration": (["--exposures", "100", "--repeats", "2"], ["--exposures", "300"]),
    "peers": (["--exposures", "2"], ["--exposures", "5"]),
    "integration": (["--frames", "10", "--repeats", "3"], []),
    "integrators": (
        ["--frames", "48", "--read-ahead-frames", "1000", "--repeats", "2"],
        ["--frames", "96", "--repeats", "3"],
    ),
    "store": (["--exposures", "100", "--repeats", "2"], []),
    "writer": (["--exposures", "256", "--repeats", "2"], ["--exposures", "1024"]),
}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


#: With ``--gpu`` where there is CUDA: name: (``python -m benchmarks.MODULE``, arguments).
#: The model alone at batches of 1 to 16,384, and the GPU mode (the workers integrate on the
#: GPU) on Eiger 4M frames as a stream sends them, latency at 560 Hz among its rates.
GPU_STEPS: dict[str, tuple[str, list[str]]] = {
    "device_inference": ("device_inference", ["--out", str(RESULTS / "device_inference.json")]),
    "pipeline_gpu_mode": (
        "pipeline",
        [
            *("--detectors", "eiger4m", "--frames", "4000", "--repeats", "1"),
            *("--latency-s", "5", "--rate-hz", "560", "--compressed", "--integrate-on-workers"),
            *("--out", str(RESULTS / "pipeline_gpu_mode.json")),
        ],
    ),
}


def run(quick: bool, gpu: bool, only: list[str] | None = None) -> int:
    started = time.time()
    steps = {name: (name, STEPS[name][0 if quick else 1]) for name in only or STEPS}
    if gpu:
        if _cuda():
            steps.update(GPU_STEPS)
        else:
            print("--gpu: no CUDA device here; the GPU figures stay as stored", flush=True)
    record: dict = {
        "quick": quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "steps": {},
    }
    failed = 0
    for name, (module, arguments) in steps.items():
        print(f"== {name} {' '.join(arguments)}", flush=True)
        start = time.perf_counter()
        command = [sys.executable, "-m", f"benchmarks.{module}", *arguments]
        status = subprocess.run(command).returncode
        record["steps"][name] = {
            "arguments": arguments,
            "seconds": round(time.perf_counter() - start, 1),
            "status": "ok" if status == 0 else f"failed ({status})",
        }
        failed += status != 0
        print(
            f"== {name}: {record['steps'][name]['status']} in {record['steps'][name]['seconds']} s"
        )
    record["wall_s"] = time.time() - started
    record["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (RESULTS / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    update()
    print(f"docs/performance.md updated; {len(steps) - failed} of {len(steps)} benchmarks ran")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="run the benchmarks and regenerate the summary")
    runner.add_argument("--quick", action="store_true", help="fewer repeats: under 10 minutes")
    runner.add_argument("--gpu", action="store_true", help="also the GPU throughput, with CUDA")
    runner.add_argument("--only", nargs="+", choices=sorted(STEPS), help="just these")
    commands.add_parser("report", help="regenerate the summary from the stored results")
    args = parser.parse_args()
    if args.command == "report":
        update()
        return 0
    return run(args.quick, args.gpu, args.only)


if __name__ == "__main__":
    sys.exit(main())
