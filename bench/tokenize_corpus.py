"""Tokenizing a corpus on one machine: ours vs upstream encodec's per-file loop vs Hugging Face
transformers' EncodecModel in padded batches, same weights, one run.

    python -m bench.tokenize_corpus [--clips 200] [--device cpu|cuda] [--workers N] [--out bench/results]
    python -m bench.tokenize_corpus --smoke          # a few short clips: checks the script runs

The corpus (made once under --corpus): `--clips` clips of 1-30 s (log-uniform), mono and stereo,
16, 22.05, 44.1 and 48 kHz, wav and flac: speech from espeak-ng (Debian package), synthesized
music (notes with harmonics and envelopes), and speech over music; never silence. The model is
the 24 kHz one with random weights (the official ones need a download), the same for all three,
converted to transformers' layout for it. Each implementation runs in its own process (peak
memory is that process's maximum RSS), with torch's default threads and the allocator setting
the `encodec-fast` command applies (`encodec_fast.cpu.tune_cpu_allocator`) in all three; the
results record both. Also a benchmark of the suite (`python -m bench --only tokenize`):
- ours: the `encodec-fast tokenize` command (DataLoader workers, Parquet shards);
- upstream: for each file, read (soundfile), `encodec.utils.convert_audio`, `model.encode`,
  `torch.save` the codes;
- transformers: read and convert each file the same way, then `EncodecModel.encode` on padded
  batches of --hf-batch clips (length-sorted, with the padding mask), codes saved per file.
Reported: audio hours per hour of wall time, peak memory, and the share of codes equal to
upstream's.
"""

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import numpy as np

from bench import peers
from bench.core import map_processes

ROOT = Path(__file__).resolve().parent.parent


RATES = (16000, 22050, 44100, 48000)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Audio language models learn from discrete tokens produced by neural codecs.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "A journey of a thousand miles begins with a single step, said the old traveller.",
    "Residual vector quantization encodes each frame with a cascade of codebooks.",
    "In the morning the market fills with voices, bicycles and the smell of bread.",
    "Please remember to bring the blue notebook and two pencils to the meeting.",
    "Thunderstorms are expected this afternoon, with strong winds along the coast.",
]
VOICES = ["en", "en-us", "en-gb-x-rp", "fr", "de", "es", "it", "nl"]


def _speech(seconds: float, rng: np.random.Generator, workdir: Path) -> tp.Tuple[np.ndarray, int]:
    """espeak-ng speech of about `seconds` (sentences until long enough) -> (mono float32, 22050)."""
    import soundfile as sf
    parts: tp.List[np.ndarray] = []
    total = 0
    while total < seconds * 22050:
        wav = workdir / "speech.wav"
        subprocess.run(["espeak-ng", "-v", str(rng.choice(VOICES)), "-s", str(int(rng.integers(130, 200))),
                        "-p", str(int(rng.integers(30, 70))), "-w", str(wav), str(rng.choice(SENTENCES))],
                       check=True, capture_output=True)
        data, sr = sf.read(str(wav), dtype="float32")
        parts += [data, np.zeros(int(rng.integers(1000, 6000)), np.float32)]
        total += len(data)
    return np.concatenate(parts)[: int(seconds * 22050)], 22050


def _music(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """n samples of notes (a random melody over a pentatonic scale, harmonics, attack/decay) and a bass."""
    out = np.zeros(n, np.float64)
    t_note = 0
    scale = 220 * 2 ** (np.array([0, 2, 4, 7, 9, 12, 14, 16]) / 12)
    while t_note < n:
        dur = int(sr * rng.uniform(0.12, 0.6))
        f = rng.choice(scale) * rng.choice([0.5, 1, 2])
        t = np.arange(min(dur, n - t_note)) / sr
        env = np.minimum(1, t / 0.01) * np.exp(-t * rng.uniform(2, 8))
        out[t_note:t_note + len(t)] += env * sum(np.sin(2 * np.pi * f * h * t) / h ** 1.5 for h in range(1, 7))
        t_note += dur
    t = np.arange(n) / sr
    out += 0.3 * np.sin(2 * np.pi * rng.choice([55, 65.4, 73.4]) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
    return (out / (np.abs(out).max() + 1e-9) * 0.5).astype(np.float32)


def make_corpus(root: Path, clips: int, smoke: bool, seed: int = 0) -> tp.List[Path]:
    import soundfile as sf
    import torch

    from encodec_fast.dsp import resample
    root.mkdir(parents=True, exist_ok=True)
    done = root / "_complete.json"
    if done.exists() and json.loads(done.read_text())["clips"] == clips:
        return sorted(p for p in root.rglob("*") if p.suffix in (".wav", ".flac"))
    rng = np.random.default_rng(seed)
    have_espeak = shutil.which("espeak-ng") is not None
    if not have_espeak and not smoke:
        raise SystemExit("espeak-ng is needed for the speech clips: apt-get install espeak-ng")
    paths = []
    for i in range(clips):
        seconds = float(np.exp(rng.uniform(math.log(1), math.log(30)))) if not smoke else 1.0 + i % 3
        sr, channels = RATES[i % 4], 1 + (i // 4) % 2
        kind = ("speech", "music", "mix")[i % 3] if have_espeak else "music"
        if kind == "music":
            data = np.stack([_music(int(seconds * sr), sr, rng) for _ in range(channels)])
        else:
            speech, ssr = _speech(seconds, rng, root)
            speech = resample(torch.from_numpy(speech), ssr, sr).numpy()
            data = np.stack([speech] * channels) * (1.0 if channels == 1 else np.array([[1.0], [0.7]]))
            if kind == "mix":
                data = 0.8 * data + 0.25 * np.stack([_music(data.shape[1], sr, rng) for _ in range(channels)])
        path = root / f"{kind}" / f"clip{i:04d}_{sr}_{channels}ch.{'flac' if i % 2 else 'wav'}"
        path.parent.mkdir(exist_ok=True)
        sf.write(str(path), data.T.astype(np.float32), sr)
        paths.append(path)
    (root / "speech.wav").unlink(missing_ok=True)
    done.write_text(json.dumps({"clips": clips}))
    return sorted(paths)


def run_ours(corpus: Path, out: Path, checkpoint: Path, device: str, workers: int) -> tp.Dict[str, tp.Any]:
    """The command as users run it (`encodec-fast tokenize`)."""
    from encodec_fast import cli
    status = cli.main(["tokenize", str(corpus), "-o", str(out), "--checkpoint", str(checkpoint), "-b", "6",
                       "--device", device, "--workers", str(workers), "--overwrite", "--quiet"])
    from encodec_fast.tokenize import read_codes
    return {"items": sum(1 for _ in read_codes(out, columns=["id"])), "failed": status}


def _read(path: Path, model_sr: int, channels: int):
    import soundfile as sf
    import torch
    from encodec.utils import convert_audio
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return convert_audio(torch.from_numpy(data.T.copy()), sr, model_sr, channels)


def run_upstream(paths: tp.List[Path], out: Path, checkpoint: Path, device: str) -> tp.Dict[str, tp.Any]:
    import encodec
    import torch
    model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    model.load_state_dict(torch.load(checkpoint))
    model.set_target_bandwidth(6.0)
    model = model.to(device).eval()
    out.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(paths):
        wav = _read(p, model.sample_rate, model.channels).to(device)
        with torch.no_grad():
            frames = model.encode(wav[None])
        torch.save(frames[0][0][0].to(torch.int16).cpu(), out / f"{i:05d}.pt")
    return {"items": len(paths)}


def run_transformers(paths: tp.List[Path], out: Path, checkpoint: Path, device: str, batch: int
                     ) -> tp.Dict[str, tp.Any]:
    import torch
    import transformers
    model = transformers.EncodecModel(transformers.EncodecConfig())
    state = peers.to_transformers(torch.load(checkpoint))
    if not set(state) <= set(model.state_dict()):  # older transformers: weight norm as weight_g / weight_v
        state = {k.replace(".parametrizations.weight.original0", ".weight_g")
                 .replace(".parametrizations.weight.original1", ".weight_v"): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    model = model.to(device).eval()
    out.mkdir(parents=True, exist_ok=True)
    wavs = [(i, _read(p, 24000, 1)[0]) for i, p in enumerate(paths)]
    wavs.sort(key=lambda iw: -iw[1].shape[-1])
    for start in range(0, len(wavs), batch):
        group = wavs[start:start + batch]
        longest = group[0][1].shape[-1]
        x = torch.zeros(len(group), 1, longest)
        mask = torch.zeros(len(group), longest, dtype=torch.long)
        for row, (_, w) in enumerate(group):
            x[row, 0, : w.shape[-1]] = w
            mask[row, : w.shape[-1]] = 1
        with torch.no_grad():
            codes = model.encode(x.to(device), mask.to(device), bandwidth=6.0).audio_codes[0]  # [B, K, T]
        for row, (i, w) in enumerate(group):
            torch.save(codes[row, :, : math.ceil(w.shape[-1] / 320)].to(torch.int16).cpu(), out / f"{i:05d}.pt")
    return {"items": len(paths)}


def child(args) -> int:
    import torch

    from encodec_fast.cpu import tune_cpu_allocator
    # The allocator setting the encodec-fast command applies, in every implementation's process
    # (so that the comparison is of the code, not of glibc's settings); threads: torch's default.
    tuned = tune_cpu_allocator()
    paths = sorted(p for p in args.corpus.rglob("*") if p.suffix in (".wav", ".flac"))
    t0 = time.perf_counter()
    if args.run == "ours":
        info = run_ours(args.corpus, args.work / "ours", args.checkpoint, args.device, args.workers)
    elif args.run == "upstream":
        info = run_upstream(paths, args.work / "upstream", args.checkpoint, args.device)
    else:
        info = run_transformers(paths, args.work / "transformers", args.checkpoint, args.device, args.hf_batch)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"wall_seconds": wall, "peak_rss_mb": peak, "peak_rss_worker_mb": children,
                      "allocator": "tuned" if tuned else "default", "threads": torch.get_num_threads(), **info}))
    return 0


def agreement(work: Path, paths: tp.List[Path], which: str) -> float:
    """Share of codes equal to upstream's (per file, over upstream's frames)."""
    import torch
    same = total = 0
    if which == "ours":
        from encodec_fast.tokenize import read_codes
        rows = {r["path"]: r["codes"] for r in read_codes(work / "ours")}
    for i, p in enumerate(paths):
        ref = torch.load(work / "upstream" / f"{i:05d}.pt").numpy()
        got = rows[str(p)] if which == "ours" else torch.load(work / which / f"{i:05d}.pt").numpy()
        n = min(ref.shape[1], got.shape[1])
        same += int((ref[:, :n] == got[:, :n]).sum())
        total += ref.size
    return same / max(total, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/encodec_fast_bench_corpus"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/encodec_fast_bench_work"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--hf-batch", type=int, default=8)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--run", choices=["ours", "upstream", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return child(args)
    report, md = measure(args)
    print(md)
    if not args.smoke:
        from bench.report import save
        save(args.out, f"tokenize_corpus_{args.device}", report, md)
    return 0


def measure(args) -> tp.Tuple[tp.Dict[str, tp.Any], str]:
    """Make (or reuse) the corpus, run the three implementations, each in its own process, one
    after the other; (report, markdown)."""
    import soundfile as sf
    import torch

    from bench.report import machine
    if args.smoke:
        args.clips = min(args.clips, 6)
    paths = make_corpus(args.corpus, args.clips, args.smoke)
    seconds = sum(sf.info(str(p)).duration for p in paths)
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    from bench.peers import random_state
    checkpoint = args.work / "weights.th"
    torch.save(random_state("24khz", seed=1), checkpoint)
    workers = args.workers if args.workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    skip = getattr(args, "skip", {})  # {implementation: the caller's reason for not running it}
    # One after the other, unless the caller asks for them at once (the suite's smoke run: a
    # plumbing check, whose times then share the machine, its cores shared out).
    order = [which for which in ("upstream", "ours", "transformers") if which not in skip]
    together = getattr(args, "at_once", False) and len(order) > 1

    def run(which: str, threads: tp.Optional[tp.Dict[str, str]]) -> tp.Dict[str, tp.Any]:
        cmd = [sys.executable, "-m", "bench.tokenize_corpus", "--run", which, "--corpus", str(args.corpus),
               "--work", str(args.work),
               "--checkpoint", str(checkpoint), "--device", args.device, "--workers", str(workers),
               "--hf-batch", str(args.hf_batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **(threads or {})})
        if proc.returncode:  # a peer that cannot run here (e.g. not installed): its reason, not a number
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            print(f"{which} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", file=sys.stderr)
            return {"error": (tail[-1] if tail else f"exit status {proc.returncode}")[:300]}
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        out["audio_hours_per_hour"] = seconds / out["wall_seconds"]
        print(which, out, flush=True)
        return out
    results = {**dict(zip(order, map_processes(run, order, together))),
               **{which: {"error": why} for which, why in skip.items()}}
    if "error" not in results["upstream"]:
        for which in ("ours", "transformers"):
            if "error" not in results[which]:
                results[which]["codes_equal_upstream"] = agreement(args.work, paths, which)

    def speedup(peer: str) -> tp.Optional[float]:
        if "error" in results[peer] or "error" in results["ours"]:
            return None
        return results[peer]["wall_seconds"] / results["ours"]["wall_seconds"]
    report = {**machine(), "device": args.device, "clips": len(paths), "audio_hours": seconds / 3600,
              "processes_at_once": len(order) if together else 1,
              "workers": workers, "hf_batch": args.hf_batch, "results": results,
              "speedup_vs_upstream": speedup("upstream"), "speedup_vs_transformers": speedup("transformers")}
    lines = [f"# Tokenizing a corpus: ours vs upstream vs transformers ({report['date'][:10]})", "",
             f"{report['cpu']}, {report['cpu_count']} cores, torch {torch.__version__}, device {args.device}; "
             f"{len(paths)} clips, {seconds / 3600:.3f} h (1-30 s; 16/22.05/44.1/48 kHz; mono/stereo; wav/flac; "
             f"espeak-ng speech, synthesized music, both); 24 kHz model, 6 kbps, random weights; ours with "
             f"{workers} decoding workers; transformers in padded batches of {args.hf_batch}. "
             f"`python -m bench.tokenize_corpus --clips {args.clips} --device {args.device}`", "",
             "| implementation | wall s | audio h per h | peak RSS MB (main / workers) | codes equal upstream |",
             "|---|---|---|---|---|"]
    for which in ("ours", "upstream", "transformers"):
        r = results[which]
        if "error" in r:
            lines.append(f"| {which} | n/a ({r['error']}) | | | |")
            continue
        agree = f"{100 * r['codes_equal_upstream']:.4f}%" if "codes_equal_upstream" in r else "(reference)"
        lines.append(f"| {which} | {r['wall_seconds']:.1f} | {r['audio_hours_per_hour']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} / {r['peak_rss_worker_mb']:.0f} | {agree} |")
    lines += ["", "; ".join(f"ours vs {peer}: " + ("n/a" if report[key] is None else f"{report[key]:.2f}x")
                            for peer, key in (("upstream's loop", "speedup_vs_upstream"),
                                              ("transformers", "speedup_vs_transformers")))]
    md = "\n".join(lines) + "\n"
    return report, md


if __name__ == "__main__":
    sys.exit(main())
