#!/usr/bin/env bash
# Everything tools/gpu_session.sh needs that a GPU machine without registry access cannot make,
# prepared on a machine that has it (run from the repository's root, with espeak-ng for speech):
#   bash tools/gpu_prepare.sh [PYTHON_VERSION]      (the GPU machine's Python, default 3.12)
# - .whl/: wheels of what the GPU image lacks (soundfile and its cffi/pycparser, upstream encodec
#   0.1.1 for the peers' columns, vector-quantize-pytorch and its needs), manylinux x86-64, checked
#   to run the GPU session's benchmarks with the image's packages (tools/carry_wheels.py);
# - .gpu_data/clips: the benchmarks' held-out speech and music (ENCODEC_FAST_BENCH_CLIPS);
# - .gpu_data/corpus: a small training corpus (tools/precision_curves.sh);
# - .gpu_data/tokenize: the tokenize benchmark's quick corpus (24 clips, 13 MB; ENCODEC_FAST_BENCH_CORPUS);
# - .gpu_data/triton_cache.tar.xz: every launch of the scenarios compiled for sm_90 into Triton's cache,
#   keyed as the GPU image's triton on its Python computes them (tools/triton_cache.py; needs this
#   machine's python3 to have the image's triton, constraints/gpu-image.txt: 17 min on 2 cores).
# Both folders are git-ignored; carry them to the GPU machine with the working tree.
set -eu
py=${1:-3.12}
mkdir -p .whl .gpu_data
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
    platforms+=(--platform "$p")
done
carry_wheels() {  # carry_wheels PYTHON_VERSION DIR: what the runs need that the GPU image lacks (its package
    # list in the device tool's KINDS.md has transformers, matplotlib, pyarrow, pytest, einops, tqdm)
    PIP_CONFIG_FILE=/dev/null python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$1" \
        --implementation cp "${platforms[@]}" -d "$2" soundfile cffi pycparser vector-quantize-pytorch einx \
        frozendict loguru torch-einops-utils
    PIP_CONFIG_FILE=/dev/null python3 -m pip wheel -q --no-deps -w "$2" encodec==0.1.1
}
carry_wheels "$py" .whl
# The same set for this machine's Python, with nothing else installed but what the GPU image has: the GPU
# tests collected and the session's benchmarks in their smoke suite, every peer importing
# (tools/carry_wheels.py session; needs ours installed with pip install -e .). A package the tests or the
# peers come to need is found here, not on the GPU's clock.
here=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
tc=$(mktemp -d); mkdir "$tc/whl"
if carry_wheels "$here" "$tc/whl" \
        && python3 -m pip install -q --no-index --no-deps --target "$tc/site" "$tc"/whl/*.whl; then
    python3 -m tools.carry_wheels session "$tc/site" \
        || echo "the carried wheels will not run the GPU session's tests and benchmarks: see above"
fi
rm -rf "$tc"
ENCODEC_FAST_BENCH_CLIPS=.gpu_data/clips python3 -c "
from bench.benchmarks.quality import heldout_clips
clips, missing = heldout_clips(['speech', 'music'], 4, 8.0)
print({k: len(v) for k, v in clips.items()}, missing or '')"
[ -d .gpu_data/corpus/train ] || python3 -m tools.make_train_corpus .gpu_data/corpus --speech-clips 24 \
    --music-clips 16 --heldout-clips 2
python3 -c "
from pathlib import Path
from bench.benchmarks.tokenize import make_corpus
print(len(make_corpus(Path('.gpu_data/tokenize'), 24, False)), 'clips for the tokenize benchmark')"
triton=$(sed -n 's/^triton==//p' constraints/gpu-image.txt)
if [ -f .gpu_data/triton_cache.tar.xz ]; then
    echo "kept .gpu_data/triton_cache.tar.xz (remove it to build it again after a kernel changes)"
elif python3 -c "import sys, triton; sys.exit(triton.__version__ != '$triton')" 2>/dev/null; then
    libtriton=()
    if [ "$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$py" ]; then
        # Triton's cache key hashes libtriton.so, which differs by Python version: take the GPU
        # machine's from the same triton's wheel for its Python.
        tw=$(mktemp -d)
        PIP_CONFIG_FILE=/dev/null python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
            --implementation cp "${platforms[@]}" -d "$tw" "triton==$triton"
        python3 -m zipfile -e "$tw"/triton-*.whl "$tw/x" && libtriton=(--libtriton "$tw/x/triton/_C/libtriton.so")
    fi
    # A failed check (a miss, a kernel over the shared memory: printed) still leaves a useful cache.
    env -u TRITON_INTERPRET python3 -m tools.triton_cache build .gpu_data/triton_cache ${libtriton[@]+"${libtriton[@]}"} \
        || echo "tools.triton_cache build: problems (above); packing the cache all the same"
    [ -f .gpu_data/triton_cache/encodec_fast_triton_cache.json ] \
        && python3 -m tools.triton_cache pack .gpu_data/triton_cache .gpu_data/triton_cache.tar.xz
    rm -rf .gpu_data/triton_cache ${tw:+"$tw"}
else
    echo "no .gpu_data/triton_cache.tar.xz: it needs python3 with triton $triton (constraints/gpu-image.txt)"
fi
du -sh .whl .gpu_data  # the device tool carries 64 MiB at most
