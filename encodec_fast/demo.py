"""Offline demo of the main jobs: tokenize a small corpus, and compress and decompress a clip,
with the `encodec-fast` command.

    python -m encodec_fast.demo [OUT_DIR] [--official]

Writes OUT_DIR/corpus/ (12 generated clips: 16-48 kHz, mono and stereo, wav and flac) and
tokenizes it into OUT_DIR/codes/ (Parquet shards); writes OUT_DIR/demo.wav (a generated 5 s
speech-like clip), compresses it to demo.ecdc at 6 kbps and decodes it to demo_decompressed.wav,
through the command's own code. Without --official it uses the small 24 kHz codec that ships with
the package (`--model small`: trained by this project's trainer, works offline; see the README
for its quality); with --official, the official 24 kHz weights (a download).
"""

import argparse
import time
from pathlib import Path

from . import cli
from .audio import save_audio
from .testing import voice


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path("encodec_demo"))
    parser.add_argument("--official", action="store_true",
                        help="use the official 24 kHz weights (downloads them) instead of the small shipped codec")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    wav_path = args.out_dir / "demo.wav"
    save_audio(voice(24000, 5.0), wav_path, 24000)
    extra = [] if args.official else ["--model", "small"]
    if not args.official:
        print("the small shipped codec (--model small); pass --official to download the official weights")
    corpus = args.out_dir / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(12):
        rate, channels = (16000, 22050, 44100, 48000)[i % 4], 1 + i % 2
        clip = voice(rate, 1.0 + 0.5 * i, seed=i)
        save_audio(clip.expand(channels, -1), corpus / f"clip{i:02d}.{'flac' if i % 3 else 'wav'}", rate)
    status = cli.main(["tokenize", str(corpus), "-o", str(args.out_dir / "codes"), "-b", "6", "--overwrite",
                       "--workers", "1", *extra])
    if status:
        return status
    ecdc_path = args.out_dir / "demo.ecdc"
    t0 = time.perf_counter()
    status = cli.main([str(wav_path), str(ecdc_path), "-f", "-b", "6", *extra])
    t1 = time.perf_counter()
    if status:
        return status
    status = cli.main([str(ecdc_path), str(args.out_dir / "demo_decompressed.wav"), "-f", *extra])
    t2 = time.perf_counter()
    if status:
        return status
    size = ecdc_path.stat().st_size
    print(f"{wav_path}: 5.0 s -> {ecdc_path} {size} bytes ({8 * size / 5.0 / 1000:.2f} kbps); "
          f"compress {t1 - t0:.2f} s, decompress {t2 - t1:.2f} s (model loading included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
