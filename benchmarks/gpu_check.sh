#!/usr/bin/env bash
# The GPU checks, for a lent GPU machine, in well under 8 minutes.
#
#   bash benchmarks/gpu_check.sh --prepare   # here, once: prepares the 1,115,394-character Shakespeare
#                                            # prefix into .gpu-data/ (the GPU machine is offline)
#   bash benchmarks/gpu_check.sh             # on the GPU machine, with .gpu-data carried along;
#                                            # results in $OUT (default /tmp/gpu-check)
#
# 1. tests/test_gpu.py: the CUDA code paths (SDPA against manual attention, bf16 and fp16 training
#    steps, the KV cache, the flat decode step, a GPU checkpoint loaded on the CPU).
# 2. Throughput of the shakespeare preset at batch 64: eager bf16 against bf16 + torch.compile, with
#    model FLOP utilisation against a bf16 matmul measured in the same run.
# 3. The speed runs: the shakespeare preset with bf16 autocast and torch.compile for 60 s of training
#    on the prefix: best val loss (target <= 1.47) and when 1.47 was first reached; first with the
#    preset's own settings, then with those of SPEEDRUN_SET (default: Muon, which the CPU presets
#    use and no GPU has tried yet; docs/performance.md section 7 compares nanoGPT's batch 64,
#    lr 1e-3), and SPEEDRUN_EXTRA if set.
# A failed step is reported and the next one still runs: device time is scarce. A dry run of the
# whole script on a CPU, before spending GPU time on it (about 2 minutes):
#   PRESET=tiny MINUTES=0.1 STEPS=2 WARMUP=1 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export MINIGPT2_BENCH_DIR="$PWD/.gpu-data"

if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.gpu-data/' .git/info/exclude 2>/dev/null || echo '/.gpu-data/' >> .git/info/exclude
    .venv/bin/python -c 'import sys; sys.path.insert(0, "benchmarks")
from common import shakespeare_prefix_data; print("prepared", shakespeare_prefix_data(256))'
    exit 0
fi

PY="${PYTHON:-python3}"
PRESET="${PRESET:-shakespeare}" MINUTES="${MINUTES:-1}" STEPS="${STEPS:-30}" WARMUP="${WARMUP:-10}"
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Fail at once, not minutes in: the package must import and the corpus must have come along.
"$PY" -c 'import torch, minigpt2.training.trainer
print("torch", torch.__version__, "on", torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)")'
if [ ! -f "$MINIGPT2_BENCH_DIR/shakespeare-1115394/meta.json" ]; then
    echo "no prepared corpus in .gpu-data: run 'bash benchmarks/gpu_check.sh --prepare' here and carry .gpu-data" >&2
    exit 2
fi

echo "== 1. GPU tests"
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.txt" || echo "(GPU tests failed)"

echo "== 2. throughput, $PRESET preset, batch 64"
"$PY" benchmarks/train_throughput.py --preset "$PRESET" --batch-size 64 --steps "$STEPS" --warmup "$WARMUP" \
    --paths fast,fast+compile 2>&1 | tee "$OUT/throughput.txt" || echo "(throughput failed)"

speed_run() {  # speed_run NAME [KEY=VALUE ...]
    local name="$1"
    shift
    echo "== 3. speed run ($name): $MINUTES minute(s) of training, bf16 + torch.compile $*"
    "$PY" benchmarks/quality_at_budget.py --preset "$PRESET" --minutes "$MINUTES" --target 1.47 \
        --set compile=true eval_interval=250 eval_iters=20 "$@" \
        --plot "$OUT/val_loss_vs_time_gpu_$name.png" 2>&1 | tee "$OUT/speedrun_$name.txt" || echo "(speed run failed)"
}
speed_run preset
# shellcheck disable=SC2086 # SPEEDRUN_SET holds several KEY=VALUE words
speed_run set ${SPEEDRUN_SET:-optimizer=muon}
# shellcheck disable=SC2086 # as above; an optional third run, e.g. SPEEDRUN_EXTRA="dropout=0.2"
if [ -n "${SPEEDRUN_EXTRA:-}" ]; then speed_run extra $SPEEDRUN_EXTRA; fi
