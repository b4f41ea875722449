#!/usr/bin/env bash
# Train the three posterior models of benchmarks/posterior_models.py side by side on one GPU
# (the device machine of this workplace: python3 with torch and CUDA, no package index).
# Wheels of sbi, nflows, skorch and zuko travel in .whl/. A 500-step probe of all three,
# run together, sets the common budget: the most steps (<= STEPS, in thousands) that the
# slowest finishes within BUDGET_S. Results land in $OUT as one tar file per model
# (weights, card, training state, log), also when a run hits its time limit.
# Usage: bash benchmarks/device_posterior_models.sh STEPS BUDGET_S
set -u
max_steps=${1:-25000}
budget=${2:-420}
out=${OUT:-/tmp/device-out}
kinds="maximum-likelihood bidirectional sbi-npe"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

run_all() {  # run_all STEPS DIR LIMIT_S
    for kind in $kinds; do
        mkdir -p "$2/$kind"
        (timeout "$3" python3 -m benchmarks.posterior_models train "$kind" --steps "$1" \
            --device cuda --checkpoint-dir "$2/$kind/state" --out "$2/$kind/$kind" \
            >"$2/$kind/log.txt" 2>&1; echo "exit $?" >>"$2/$kind/log.txt") &
    done
    wait
}

run_all 500 /tmp/probe 200
steps=$(python3 - "$max_steps" "$budget" <<'PY'
import json, sys
walls = []
for kind in ("maximum-likelihood", "bidirectional", "sbi-npe"):
    card = json.load(open(f"/tmp/probe/{kind}/{kind}.json"))
    walls.append(card["training"]["wall_s"])
    print(kind, "500 steps in", round(walls[-1], 1), "s", file=sys.stderr)
per_step = max(walls) / 500
print(min(int(sys.argv[1]), int(float(sys.argv[2]) / per_step) // 1000 * 1000))
PY
)
echo "common budget: $steps steps"
run_all "$steps" /tmp/run $((budget + 60))
for kind in $kinds; do
    echo "== $kind"; tail -c 400 "/tmp/run/$kind/log.txt"; echo
    tar -C /tmp/run -cf "$out/$kind.tar" "$kind"
done
