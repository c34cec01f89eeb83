#!/usr/bin/env bash
# Every GPU check and GPU benchmark of the project in one go, for a machine with a CUDA GPU.
#
#   OUT=some/dir bash benchmarks/gpu_session.sh [budget_seconds]
#
# Runs, in order of importance, each step only while enough of the time budget is left:
#   1. the GPU tests (cupy ZART kernels and entry point, torch code on cuda): pytest -m gpu / -k cuda
#   2. ZART images/s, numpy and cupy back ends on the same synthetic data, box 64 and 128
#   3. ZART quality on the demo simulation with the cupy back end (same numbers as the CPU run)
#   4. projection throughput on cuda
#   5. Zernike3Deep training at box 128, (7, 7) orthonormal, on cuda
#   6. classical refinement on cuda (5,000 particles)
#   7. the demo pipeline (when snakemake is installed), with the default profile's GPU slot
# JSON lines go to $OUT/results.jsonl, the whole log to $OUT/log.txt, the card to $OUT/env.txt.
set -u
OUT=${OUT:-benchmarks/work/gpu}
mkdir -p "$OUT"
BUDGET=${1:-420}
START=$(date +%s)
PY=${PYTHON:-python3}
LOG="$OUT/log.txt"
RES="$OUT/results.jsonl"
export PYTHONUNBUFFERED=1

left() { echo $((BUDGET - ($(date +%s) - START))); }
step() {  # step NAME SECONDS_NEEDED COMMAND...
    local name=$1 need=$2 l rc t0
    shift 2
    l=$(left)
    if ((l < need)); then
        echo "== skipped $name: ${l}s left, needs ${need}s" | tee -a "$LOG"
        return
    fi
    echo "== $name (${l}s left)" | tee -a "$LOG"
    t0=$(date +%s)
    timeout $((l - 3)) "$@" >>"$LOG" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - t0)) s" | tee -a "$LOG"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import sys, torch, cupy, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'cupy', cupy.__version__, 'numpy', numpy.__version__)"
    nproc
} >"$OUT/env.txt" 2>&1

step "GPU tests" 60 $PY -m pytest -q -p no:cacheprovider -m "gpu or not slow" -k "cuda or cupy" \
    --continue-on-collection-errors --ignore=tests/workflow tests
step "ZART speed" 60 $PY benchmarks/bench_zart.py --skip-quality --out "$RES"
step "ZART quality (cupy)" 60 $PY benchmarks/bench_zart.py --backend cupy --speed-backends --out "$RES"
step "projection speed (cuda)" 20 $PY benchmarks/bench_projection.py --devices cuda --out "$RES"
step "Zernike3Deep box 128 (cuda)" 90 $PY benchmarks/bench_zernike3deep.py --device cuda --box 128 --n 2000 \
    --epochs 10 --settings 7,7,orthonormal --out "$RES"
step "refinement (cuda)" 60 $PY benchmarks/bench_refine.py --device cuda --n-powell 0 --out "$RES"
if $PY -c "import snakemake" 2>/dev/null; then  # the whole demo pipeline, GPU stages on the GPU
    step "demo pipeline" 150 $PY -m snakemake --cores all  # results/demo/, as `make demo`
fi
echo "== done after $(($(date +%s) - START)) s" | tee -a "$LOG"
