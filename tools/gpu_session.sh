#!/usr/bin/env bash
# A time-limited run on one GPU machine, in one call (under 8 minutes with the defaults; wheels that the
# machine cannot download go in .whl/):
#   bash tools/gpu_session.sh [OUT_DIR]
# 1. installs ours (pip -e, no index) and the wheels in .whl/ (soundfile, cffi, pycparser, pytest and
#    upstream encodec for the peers' columns; `pip download` them where a registry is reachable);
# 2. the kernels on real hardware: `python -m pytest -m gpu` (correctness, JUnit XML in OUT_DIR);
# 3. the suite on the GPU (`python -m bench --suite quick --device cuda`, priority order within
#    SUITE_BUDGET seconds: codec throughput and memory, the `rvq` search, the `kernels` benchmark, then
#    the rest; BENCH_ONLY="rvq kernels" for some only), into OUT_DIR/suite;
# 4. with GPU_AUTOTUNE_LIMIT=SECONDS (default 0: skipped), the `kernels` benchmark again with
#    ENCODEC_FAST_AUTOTUNE=1 (the autotuned configurations), into OUT_DIR/autotune.
# Defaults: tests 120 s, suite budget 240 s (+90 s to finish the benchmark running at the budget).
# Each step has its own time limit; the suite rewrites results.json after every benchmark, so a limit
# costs only the benchmark it cut. Results and the log land in OUT_DIR (default $OUT, else /tmp/gpu_out).
set -u
out=${1:-${OUT:-/tmp/gpu_out}}
mkdir -p "$out"
log="$out/session.log"
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$log"; }

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >> "$log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$log" 2>&1 || say "pip install -e . failed"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$log" 2>&1
python3 -m encodec_fast info >> "$log" 2>&1 || python3 -c "import encodec_fast" >> "$log" 2>&1
say "setup done"

export PYTHONUNBUFFERED=1
step() {  # step LIMIT_SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    say "$what (limit ${limit} s)"
    timeout -k 10 "$limit" "$@" >> "$log" 2>&1
    say "exit status $?"
}
step "${GPU_TEST_LIMIT:-120}" "python -m pytest -m gpu" \
    python3 -m pytest -q -m gpu tests/test_gpu.py --junitxml "$out/gpu_tests.xml"
budget=${SUITE_BUDGET:-240}
# BENCH_ONLY="rvq kernels" restricts the suite to those benchmarks (in priority order).
only=()
if [ -n "${BENCH_ONLY:-}" ]; then read -r -a names <<< "$BENCH_ONLY"; only=(--only "${names[@]}"); fi
step $(( budget + 90 )) "python -m bench --suite quick --device cuda --budget-seconds $budget ${only[*]}" \
    python3 -m bench --suite quick --device cuda --budget-seconds "$budget" --out "$out/suite" "${only[@]}"
if [ "${GPU_AUTOTUNE_LIMIT:-0}" -gt 0 ]; then
    step "$GPU_AUTOTUNE_LIMIT" "ENCODEC_FAST_AUTOTUNE=1 python -m bench --only kernels" \
        env ENCODEC_FAST_AUTOTUNE=1 python3 -m bench --suite quick --device cuda --only kernels \
        --budget-seconds $(( GPU_AUTOTUNE_LIMIT - 30 )) --out "$out/autotune"
fi
say "session done"
