#!/usr/bin/env bash
# The GPU measurements of the LDM translation, as one prepared script for a lent GPU machine
# (docs/performance.md, "GPU"): the CUDA tests, then the paper config's translation (96^3 grid,
# 50 + 50 DDIM steps, 3 orders, guidance on) in float32, in bfloat16, and in bfloat16 with the
# UNet compiled (CUDA graphs, then inductor's default mode). Measured, never required: CI has no GPU.
#
# The machine's Python (3.12, its own torch) lacks MONAI and nibabel: carry them as wheels.
# Here, once, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl monai==1.6.1 nibabel==5.4.2
# There, one call carrying .whl, with timeout_s 600 (about 7 minutes expected; TOTAL, default 570 s, caps it):
#   bash benchmarks/gpu_check.sh
# Results land in $OUT (or /tmp/gpu_check): gpu_check.log, one JSON per variant and summary.md
# (6 files). The tests and each eager variant get at most BUDGET seconds (default 120), each compiled
# one COMPILE_BUDGET (default 200: compiling is most of it), none more than what is left of TOTAL;
# a variant that fails or runs out of time leaves the others' results. A dry run of the script on a
# CPU, with a small config: DEVICE=cpu CONFIG=demo STEPS=2 bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${BUDGET:-120}
COMPILE_BUDGET=${COMPILE_BUDGET:-200}
DEADLINE=$((SECONDS + ${TOTAL:-570}))
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-paper}
STEPS=${STEPS:-50}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >>"$LOG" 2>&1 || { echo "wheel install failed (see $LOG)"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, \
'cuda', torch.cuda.is_available())"
} >>"$LOG" 2>&1
echo "== CUDA tests" >>"$LOG"
timeout "$BUDGET" "$PYTHON" -m pytest -q -p no:cacheprovider tests/ml/test_inference.py >>"$LOG" 2>&1
echo "tests rc=$?" | tee -a "$LOG"

variant() {  # name, seconds, then bench_ldm.py options
    local name=$1 budget=$2
    shift 2
    ((budget > DEADLINE - SECONDS)) && budget=$((DEADLINE - SECONDS))
    if ((budget < 30)); then
        echo "$name skipped: no time left" | tee -a "$LOG"
        return
    fi
    echo "== $name: $*" >>"$LOG"
    # a compile killed by its timeout can leave a truncated library in inductor's cache: one cache per variant
    local cache rc
    cache=$(mktemp -d)
    TORCHINDUCTOR_CACHE_DIR=$cache timeout "$budget" "$PYTHON" benchmarks/bench_ldm.py --device "$DEVICE" \
        --config "$CONFIG" --steps "$STEPS" --repeats 3 --skip-training --json "$OUT/$name.json" "$@" >>"$LOG" 2>&1
    rc=$?
    rm -rf "$cache"
    echo "$name rc=$rc" | tee -a "$LOG"
}
variant fp32 "$BUDGET" --precision fp32
variant bf16 "$BUDGET" --precision bf16
variant bf16-cudagraphs "$COMPILE_BUDGET" --precision bf16 --compile reduce-overhead
variant bf16-compiled "$COMPILE_BUDGET" --precision bf16 --compile default

"$PYTHON" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| variant | translation s | network s (DDIM step pairs) | rest s | warm-up s | peak GPU GiB |")
print("|---|---|---|---|---|---|")
for name in ("fp32", "bf16", "bf16-cudagraphs", "bf16-compiled"):
    path = out / f"{name}.json"
    if not path.is_file():
        print(f"| {name} | failed or timed out (gpu_check.log) | | | | |")
        continue
    r = json.loads(path.read_text())
    print(f"| {name} | {r['inference_seconds']:.2f} | {r['network_seconds_estimate']:.2f} | "
          f"{r['other_seconds_estimate']:.2f} | {r['warmup_seconds']:.1f} | {r.get('peak_gpu_gib', float('nan')):.2f} |")
EOF
