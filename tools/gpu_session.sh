#!/usr/bin/env bash
# A time-limited run on one GPU machine, in one call (GPU_SESSION_SECONDS in all, default 560; wheels
# that the machine cannot download go in .whl/, held-out clips made elsewhere in .gpu_data/clips):
#   bash tools/gpu_session.sh [OUT_DIR]
# 1. installs ours (pip -e, no index) and the wheels in .whl/ (soundfile, cffi, pycparser, upstream
#    encodec, vector-quantize-pytorch and its needs: tools/gpu_prepare.sh downloads them where a registry
#    is reachable),
#    and unpacks the kernels compiled ahead of time (.gpu_data/triton_cache.tar.xz, tools/gpu_prepare.sh)
#    as Triton's cache; after each step the log says how many kernels were compiled here all the same;
# 2. the kernels on real hardware: `python -m pytest -m gpu` (correctness, JUnit XML and -v log; in
#    GPU_TEST_WORKERS processes, default 8, where pytest-xdist is installed);
# 3. the benchmarks, each in a process of its own (a GPU fault in one does not take the others with
#    it), in priority order: `rvq`, `kernels` (residual blocks and convolutions), `codec`, `tokenize`
#    (on .gpu_data/tokenize when carried), `quantizer`, `train_step`, bf16 and fp32 loss curves of
#    one recipe (tools/precision_curves.sh, 60 s each, on .gpu_data/corpus when carried), then
#    `kernels` again for its other stages (conv2d, stft, training, model). Each gets a time limit,
#    cut to what is left of the session; at its limit it gets SIGTERM and writes what it measured
#    (bench/runner.py), then the next one starts; when the session's time is spent the rest are
#    listed as not run. BENCH_ONLY="rvq codec" runs only those steps.
# Everything lands in OUT_DIR/<step>/ and, after every step, in OUT_DIR/gpu_session.tar.gz (the device
# tool brings back a few files only). Default OUT_DIR: $OUT, else /tmp/gpu_out.
set -u
out=${1:-${OUT:-/tmp/gpu_out}}
work=/tmp/gpu_session
mkdir -p "$out" "$work"
log="$work/session.log"
start=$(date +%s)
total=${GPU_SESSION_SECONDS:-560}
say() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$log"; }
pack() { tar -czf "$out/gpu_session.tar.gz.tmp" -C "$work" . 2>/dev/null && mv "$out/gpu_session.tar.gz.tmp" "$out/gpu_session.tar.gz"; }

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >> "$log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .gpu_data/clips ]; then export ENCODEC_FAST_BENCH_CLIPS=$PWD/.gpu_data/clips; fi
if [ -d .gpu_data/tokenize ]; then export ENCODEC_FAST_BENCH_CORPUS=$PWD/.gpu_data/tokenize; fi
# Kernels compiled ahead of time into Triton's cache (tools/gpu_prepare.sh): the tests and benchmarks
# find them instead of compiling on the GPU machine's clock.
if [ -f .gpu_data/triton_cache.tar.xz ] && python3 -m tools.triton_cache unpack .gpu_data/triton_cache.tar.xz \
        /tmp/triton_cache >> "$log" 2>&1; then
    export TRITON_CACHE_DIR=/tmp/triton_cache
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$log" 2>&1 || say "pip install -e . failed"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$log" 2>&1
# The image's packages with their versions (tools/carry_wheels.py checks the carried wheels against a list)
env -u PYTHONPATH python3 -m pip list --format=freeze > "$work/pip_list.txt" 2>&1 || true
python3 -m encodec_fast info >> "$log" 2>&1 || python3 -c "import encodec_fast" >> "$log" 2>&1
git log -1 --format="commit %H %cd" >> "$log" 2>&1 || true
git status --short >> "$log" 2>&1 || true
say "setup done${TRITON_CACHE_DIR:+ (Triton cache carried)}"
pack

export PYTHONUNBUFFERED=1
left() { echo $(( total - ($(date +%s) - start) )); }
step() {  # step NAME LIMIT_SECONDS COMMAND...: runs with min(limit, time left - 15 s), output in $work/NAME.log
    local name=$1 limit=$2; shift 2
    local avail=$(( $(left) - 15 ))
    if [ -n "${BENCH_ONLY:-}" ] && [[ " $BENCH_ONLY " != *" $name "* ]]; then return; fi
    if [ "$avail" -lt 20 ]; then say "$name: not run (session time spent)"; return; fi
    [ "$avail" -lt "$limit" ] && limit=$avail
    say "$name (limit ${limit} s): $*"
    timeout -k 15 "$limit" "$@" > "$work/$name.log" 2>&1
    say "$name: exit status $?"
    if [ -n "${TRITON_CACHE_DIR:-}" ]; then python3 -m tools.triton_cache report "$TRITON_CACHE_DIR" >> "$log" 2>&1; fi
    pack
}
bench() {  # bench STEP_NAME LIMIT BENCHMARK [ENV=VALUE...]: one benchmark in its own process
    local name=$1 limit=$2 which=$3; shift 3
    local avail=$(( $(left) - 15 ))
    [ "$avail" -lt "$limit" ] && limit=$avail
    step "$name" "$limit" env "$@" python3 -m bench --suite quick --device cuda --only "$which" \
        --budget-seconds $(( limit * 3 / 4 )) --out "$work/$name"
}
# The gpu tests in parallel processes (pytest-xdist is in the GPU image): their time goes mostly to
# compiling kernels (one process at a time: about 85 s for the 8 checks of the 2026-11-30 run), which
# the processes share out; the benchmarks after them find those kernels in Triton's cache.
xdist=()
if [ "${GPU_TEST_WORKERS:-8}" -gt 1 ] && python3 -c "import xdist" 2>/dev/null; then xdist=(-n "${GPU_TEST_WORKERS:-8}"); fi
step tests "${GPU_TEST_LIMIT:-110}" python3 -m pytest -q -m gpu -rA -v -p no:cacheprovider ${xdist[@]+"${xdist[@]}"} \
    tests/test_gpu.py --junitxml "$work/gpu_tests.xml"
bench rvq 90 rvq
bench conv 120 kernels BENCH_KERNEL_STAGES="block conv"
bench codec 130 codec
if python3 -c "import pyarrow" 2>/dev/null; then  # the shards' format (in the image's package list)
    bench tokenize 60 tokenize
else
    say "tokenize: not run (pyarrow, which its Parquet shards need, is not installed here)"
fi
bench quantizer 40 quantizer
bench train_step 80 train_step
corpus=.gpu_data/corpus; [ -d "$corpus/train" ] || corpus=""
step curves 170 env PRECISIONS="bf16 fp32" bash tools/precision_curves.sh "$work/curves" 60 $corpus
bench kernels 60 kernels BENCH_KERNEL_STAGES="conv2d stft training model"
say "session done"
pack
