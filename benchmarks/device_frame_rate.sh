#!/usr/bin/env bash
# The frame-rate issue's GPU checks, as one script for a lent device machine (under 10 minutes):
#   1. pyFAI's CSR matrix as a sparse tensor on CUDA against pyFAI's CPU sums, and batches of
#      frames integrated on CUDA against the host's line-outs (the CUDA cases of
#      tests/test_integration_csr.py and tests/test_integration_device.py; skipped on CPU),
#   2. the shipped model alone, 1,000 samples, batches of 1 to 16,384
#      (benchmarks.device_inference),
#   3. the GPU mode (--integrate-on-workers): Eiger 4M frames handed over bitshuffle-LZ4
#      compressed, as a DECTRIS stream leaves them, decoded by the GPU inference workers, each
#      batch integrated on the GPU and its line-outs given to the model there: the highest
#      rate it sustains, and latency p50/p99 at 10 Hz, at 90% of that rate and at 560 Hz (an
#      EIGER2 X 4M's highest), 1,000 samples per exposure, results written (benchmarks.pipeline),
#   4. the same frames decoded and integrated on the CPU instead, by 8 integrator processes
#      (what a DECTRIS stream's scan starts by itself on 16 cores), GPU inference.
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
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_integration_csr.py \
    tests/test_integration_device.py >"$out/integration_on_cuda.txt" 2>&1
echo "integration on cuda: exit $?" | tee -a "$out/integration_on_cuda.txt"
timeout 150 python3 -m benchmarks.device_inference --out "$out/device_inference.json" \
    >"$out/device_inference.txt" 2>&1
echo "device_inference: exit $?" | tee -a "$out/device_inference.txt"
timeout 190 python3 -m benchmarks.pipeline --detectors eiger4m --frames "$frames" --repeats 1 \
    --latency-s 5 --rate-hz 560 --compressed --integrate-on-workers \
    --out "$out/pipeline_gpu_mode.json" >"$out/pipeline_gpu_mode.txt" 2>&1
echo "pipeline, GPU mode: exit $?" | tee -a "$out/pipeline_gpu_mode.txt"
timeout 150 python3 -m benchmarks.pipeline --detectors eiger4m --frames "$frames" --repeats 1 \
    --latency-s 5 --rate-hz 560 --compressed --integrators 8 \
    --out "$out/pipeline_gpu.json" >"$out/pipeline_gpu.txt" 2>&1
echo "pipeline, CPU integration: exit $?" | tee -a "$out/pipeline_gpu.txt"
