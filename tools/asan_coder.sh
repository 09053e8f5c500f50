#!/usr/bin/env bash
# Build the C++ coder with AddressSanitizer + UndefinedBehaviorSanitizer and fuzz it.
#   bash tools/asan_coder.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
suffix=$(python -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
include=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
g++ -O1 -g -std=c++17 -ffp-contract=off -fno-omit-frame-pointer -fsanitize=address,undefined \
    -fno-sanitize-recover=undefined -shared -fPIC -I"$include" kernels/arith/arith.cpp -o "$out/_arith$suffix"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
LD_PRELOAD=$(g++ -print-file-name=libasan.so):$(g++ -print-file-name=libubsan.so) \
    python -m tools.fuzz_coder --seconds "${1:-60}" --so "$out/_arith$suffix"
echo "ASan/UBSan: no error reported"
