#!/usr/bin/env bash
# Loss curves of one training recipe in bf16 and in fp32, side by side (the mixed-precision check):
#   bash tools/precision_curves.sh OUT_DIR [SECONDS_PER_RUN] [CORPUS_DIR]
# Trains the small model twice for SECONDS_PER_RUN each (default 120; the trainer's --max-minutes:
# a checkpoint and an export at the end) on CORPUS_DIR/train (default: a corpus made by
# tools/make_train_corpus.py in OUT_DIR/corpus, music only where espeak-ng is missing), same seed,
# batch and losses (the paper's weights), then `encodec-fast train report` compares them:
# OUT_DIR/compare/compare.png and COMPARE.md. PRECISIONS="bf16 fp32" by default.
set -eu
out=$1
seconds=${2:-120}
corpus=${3:-}
mkdir -p "$out"
if [ -z "$corpus" ]; then
    corpus=$out/corpus
    [ -d "$corpus/train" ] || python3 -m tools.make_train_corpus "$corpus" --speech-clips 24 --music-clips 16 \
        --heldout-clips 2 --allow-no-speech
fi
minutes=$(python3 -c "print($seconds / 60)")
runs=()
for precision in ${PRECISIONS:-bf16 fp32}; do
    python3 -m encodec_fast.train "$corpus/train" -o "$out/$precision" --model small --precision "$precision" \
        --batch-size 16 --steps 1000000 --max-minutes "$minutes" --valid-every 0 --log-every 5 \
        --checkpoint-every 1000000 --seed 0 || echo "precision_curves: the $precision run failed" >&2
    runs+=("$out/$precision")
done
python3 -m encodec_fast.train report "${runs[@]}" -o "$out/compare"
