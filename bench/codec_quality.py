"""Codec quality per bandwidth on held-out audio: SI-SNR, mel distance and multi-scale STFT distance
(`encodec_fast.train.metrics`), for one or more checkpoints of a model, by kind of audio.

    python bench/codec_quality.py HELDOUT_DIR --model small [--checkpoint NAME=PATH ...] [--random]
                                  [--seconds 10] [--out DIR]

HELDOUT_DIR holds one folder per kind (e.g. speech/, music/ from bench/make_train_corpus.py).
Each file's first --seconds go through encode and decode (the public API, CPU) at every bandwidth
of the model. Without --checkpoint the model's packaged or official weights are used; --random
adds the random initialisation (torch seed 0) as a baseline.
"""

import argparse
import statistics
import sys
import typing as tp
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def evaluate(model, clips: tp.Dict[str, tp.List[torch.Tensor]]) -> tp.List[tp.Dict[str, tp.Any]]:
    from encodec_fast.train.metrics import mel_distance, si_snr, stft_distance
    rows = []
    with torch.no_grad():
        for bw in model.target_bandwidths:
            model.set_target_bandwidth(bw)
            for kind, wavs in clips.items():
                scores = {"si_snr": [], "mel_distance": [], "stft_distance": []}
                for wav in wavs:
                    x = wav[None]
                    y = model.decode(model.encode(x))[..., :x.shape[-1]]
                    scores["si_snr"].append(float(si_snr(x, y)[0]))
                    scores["mel_distance"].append(float(mel_distance(x, y, model.sample_rate)[0]))
                    scores["stft_distance"].append(float(stft_distance(x, y)[0]))
                rows.append({"kbps": bw, "kind": kind, "files": len(wavs),
                             **{k: statistics.mean(v) for k, v in scores.items()}})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("heldout", type=Path)
    parser.add_argument("--model", default="small", choices=["24khz", "48khz", "small"])
    parser.add_argument("--checkpoint", action="append", default=[], help="NAME=PATH (repeatable)")
    parser.add_argument("--random", action="store_true", help="also the random initialisation")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from encodec_fast.model import FACTORIES, SHORT_NAMES
    from encodec_fast.train.data import load_validation, scan
    factory = FACTORIES[SHORT_NAMES[args.model]]
    models = {}
    for spec in args.checkpoint:
        name, _, path = spec.partition("=")
        models[name] = factory(pretrained=False, checkpoint=path)
    if not args.checkpoint:
        models[f"{args.model} ({'shipped' if args.model == 'small' else 'official'} weights)"] = factory(pretrained=True)
    if args.random:
        torch.manual_seed(0)
        models["random initialisation"] = factory(pretrained=False)
    sample_rate, channels = next(iter(models.values())).sample_rate, next(iter(models.values())).channels
    clips = {}
    for folder in sorted(p for p in args.heldout.iterdir() if p.is_dir()):
        found, _ = scan([str(folder)], 0.1)
        clips[folder.name], _ = load_validation(found, sample_rate, channels, args.seconds)
    if not clips:
        print(f"codec_quality: no folders of audio in {args.heldout}", file=sys.stderr)
        return 1
    rows = []
    for name, model in models.items():
        for row in evaluate(model.eval(), clips):
            rows.append({"weights": name, **row})
    lines = [f"Codec quality, {args.model} model, held-out audio ({', '.join(f'{k}: {len(v)} files' for k, v in clips.items())}, "
             f"first {args.seconds:g} s of each); means over files", "",
             "| weights | audio | kbps | SI-SNR (dB) | mel distance | STFT distance |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['weights']} | {r['kind']} | {r['kbps']:g} | {r['si_snr']:.2f} | {r['mel_distance']:.3f} | "
                     f"{r['stft_distance']:.3f} |")
    import report
    report.publish("\n".join(lines), args.out, f"codec_quality_{args.model}", args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
