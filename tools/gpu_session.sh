#!/usr/bin/env bash
# A time-limited run on one GPU machine, in one call (about 9 minutes; wheels that the machine cannot download go in .whl/):
#   tools/gpu_session.sh [OUT_DIR]
# 1. installs ours (pip -e, no index) and the wheels in .whl/ (soundfile, cffi, pycparser and
#    upstream encodec for the quantizer comparison; `pip download` them where a registry is reachable);
# 2. the suite on the GPU (`python -m bench --suite quick --device cuda`, priority order within
#    SUITE_BUDGET seconds: codec throughput and memory, then bench/gpu.py's kernels and checks with
#    the default configurations, then the rest), into OUT_DIR/suite;
# 3. bench/gpu.py autotuned (kernel stages, as far as its budget goes), then (GPU_LEGACY=1) the
#    legacy configurations.
# Each run has its own time limit and writes its JSON and markdown after every stage, so a limit
# costs only the stage it cut. Results and the log land in OUT_DIR (default $OUT, else /tmp/gpu_out).
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
python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())" >> "$log" 2>&1
python3 -m encodec_fast.info >> "$log" 2>&1 || python3 -c "import encodec_fast" >> "$log" 2>&1
say "setup done"

export PYTHONUNBUFFERED=1
run() {  # run LIMIT_SECONDS ARGS...
    local limit=$1; shift
    say "bench/gpu.py $* (limit ${limit} s)"
    timeout -k 10 "$limit" python3 -m bench.gpu --quick --out "$out" "$@" >> "$log" 2>&1
    say "exit status $?"
}
# Measured on 2026-11-30: bench/gpu.py's default run takes about 200 s (100 s of it the correctness
# stage); autotuning compiles and times 4-5 configurations per layer, about 12 s per layer and dtype.
budget=${SUITE_BUDGET:-330}
say "python -m bench --suite quick --device cuda --budget-seconds $budget"
timeout -k 10 $(( budget + 90 )) python3 -m bench --suite quick --device cuda --budget-seconds "$budget" \
    --out "$out/suite" >> "$log" 2>&1
say "exit status $?"
run "${GPU_AUTOTUNE_LIMIT:-120}" --configs autotune --stages rvq,conv,conv2d --budget-seconds 90
if [ "${GPU_LEGACY:-0}" = 1 ]; then
    run "${GPU_LEGACY_LIMIT:-200}" --configs legacy --stages rvq,conv,conv2d,model
fi
say "session done"
