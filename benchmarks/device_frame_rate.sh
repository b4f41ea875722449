#!/usr/bin/env bash
# The frame-rate issue's GPU checks, as one script for a lent device machine (a few minutes):
#   1. pyFAI's CSR matrix as a sparse tensor on CUDA against pyFAI's CPU sums (the CUDA cases
#      of tests/test_integration_csr.py; skipped on CPU),
#   2. the shipped model alone, 1,000 samples, batches of 1 to 16,384
#      (benchmarks.device_inference),
#   3. the whole pipeline on Eiger 4M frames with GPU inference workers: the highest rate it
#      sustains, and latency p50/p99 at 10 Hz, at 90% of that rate and at 560 Hz (an EIGER2 X
#      4M's highest), 1,000 samples per exposure, results written (benchmarks.pipeline),
#   4. integrator processes on the machine's cores, 1 to 6, decoded frames and bitshuffle-LZ4
#      frames as a stream sends them (benchmarks.integrators): how many cores 560 Hz of
#      compressed Eiger 4M frames takes.
# The device machine has python3 with torch and CUDA but no package index: the project's other
# dependencies travel as wheels in .whl/ (pip download them here, carry .whl), installed
# into /tmp/site. Results land in $OUT; each step has its own time limit, and a step that
# fails or times out leaves the others' results.
# Usage: bash benchmarks/device_frame_rate.sh [FRAMES]  (FRAMES per throughput run, 4000)
set -u
frames=${1:-4000}
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'PY' || exit 2
import importlib, sys
missing = [m for m in ("torch", "pyFAI", "fabio", "h5py", "zmq", "msgpack", "pydantic", "prefect",
                      "bitshuffle", "lz4", "cbor2")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing on this machine (add their wheels to .whl/): {', '.join(missing)}")
import torch
print("torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
PY
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_integration_csr.py \
    >"$out/csr_on_cuda.txt" 2>&1
echo "csr on cuda: exit $?" | tee -a "$out/csr_on_cuda.txt"
timeout 180 python3 -m benchmarks.device_inference --out "$out/device_inference.json" \
    >"$out/device_inference.txt" 2>&1
echo "device_inference: exit $?" | tee -a "$out/device_inference.txt"
timeout 300 python3 -m benchmarks.pipeline --detectors eiger4m --frames "$frames" --repeats 1 \
    --latency-s 5 --rate-hz 560 --out "$out/pipeline_gpu.json" >"$out/pipeline_gpu.txt" 2>&1
echo "pipeline: exit $?" | tee -a "$out/pipeline_gpu.txt"
timeout 300 python3 -m benchmarks.integrators --frames 100 --repeats 1 --max-processes 6 \
    --out "$out/integrators.json" >"$out/integrators.txt" 2>&1
echo "integrators: exit $?" | tee -a "$out/integrators.txt"
