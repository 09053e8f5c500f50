"""`tokenize`: tokenizing a corpus on one machine, ours (the `encodec-fast tokenize` command) against
upstream encodec's per-file loop and Hugging Face transformers' EncodecModel in padded batches, on the
same weights, each implementation in its own process.

The corpus (made once, or $ENCODEC_FAST_BENCH_CORPUS): clips of 1-30 s (log-uniform), mono and
stereo, 16, 22.05, 44.1 and 48 kHz, wav and flac: speech from espeak-ng (Debian package),
synthesized music (notes with harmonics and envelopes), and speech over music; never silence. The
24 kHz model with random weights, converted to transformers' layout for it. Each process has torch's
default threads and the allocator setting of the `encodec-fast` command; peak memory is the
process's maximum RSS (and its workers').
- ours: `encodec-fast tokenize` (DataLoader workers, Parquet shards); on CUDA also "ours, CUDA graphs"
  (`--cuda-graphs`: each batch shape replayed from a captured graph);
- upstream: for each file, read (soundfile), `encodec.utils.convert_audio`, `model.encode`,
  `torch.save` the codes;
- transformers: read and convert each file the same way, then `EncodecModel.encode` on padded
  batches (length-sorted, with the padding mask), codes saved per file.
Recorded: wall time (audio hours per hour in the report), peak memory, and the share of codes equal
to upstream's.
"""

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
from bench.core import ROOT, SMOKE_LEFT_OUT, Context, benchmark, map_processes, side_by_side_note

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


#: Our variants: name -> (output folder, extra arguments of the command).
OURS = {"ours": ("ours", []), "ours, CUDA graphs": ("ours_graphs", ["--cuda-graphs"])}


def run_ours(corpus: Path, out: Path, checkpoint: Path, device: str, workers: int,
             extra: tp.Sequence[str] = ()) -> tp.Dict[str, tp.Any]:
    """The command as users run it (`encodec-fast tokenize`)."""
    from encodec_fast import cli
    status = cli.main(["tokenize", str(corpus), "-o", str(out), "--checkpoint", str(checkpoint), "-b", "6",
                       "--device", device, "--workers", str(workers), "--overwrite", "--quiet", *extra])
    from encodec_fast.tokenize import read_codes
    last = json.loads((out / "_manifest.json").read_text()).get("last_run", {})
    # where the time went, and the reading processes' own rate (can the CPUs feed the encoder?)
    return {"items": sum(1 for _ in read_codes(out, columns=["id"])), "failed": status,
            "seconds_by_stage": last.get("seconds_by_stage", {}), "gpu_stages": last.get("gpu_stages", []),
            "reading": last.get("reading", {})}


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
    transformers = peers.import_transformers()
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


def child(which: str, corpus: str, work: str, checkpoint: str, device: str, workers: str, hf_batch: str) -> None:
    """One implementation in this (child) process; prints one JSON line (`python -m bench.child tokenize ...`)."""
    import torch

    from encodec_fast.cpu import tune_cpu_allocator
    # The allocator setting the encodec-fast command applies, in every implementation's process
    # (so that the comparison is of the code, not of glibc's settings); threads: torch's default.
    tuned = tune_cpu_allocator()
    corpus_dir, work_dir = Path(corpus), Path(work)
    paths = sorted(p for p in corpus_dir.rglob("*") if p.suffix in (".wav", ".flac"))
    t0 = time.perf_counter()
    if which in OURS:
        folder, extra = OURS[which]
        info = run_ours(corpus_dir, work_dir / folder, Path(checkpoint), device, int(workers), extra)
    elif which == "upstream":
        info = run_upstream(paths, work_dir / "upstream", Path(checkpoint), device)
    else:
        info = run_transformers(paths, work_dir / "transformers", Path(checkpoint), device, int(hf_batch))
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"wall_seconds": wall, "peak_rss_mb": peak, "peak_rss_worker_mb": children,
                      "allocator": "tuned" if tuned else "default", "threads": torch.get_num_threads(), **info}))


def agreement(work: Path, paths: tp.List[Path], which: str) -> float:
    """Share of codes equal to upstream's (per file, over upstream's frames)."""
    import torch
    same = total = 0
    if which in OURS:
        from encodec_fast.tokenize import read_codes
        rows = {r["path"]: r["codes"] for r in read_codes(work / OURS[which][0])}
    for i, p in enumerate(paths):
        ref = torch.load(work / "upstream" / f"{i:05d}.pt").numpy()
        got = rows[str(p)] if which in OURS else torch.load(work / which / f"{i:05d}.pt").numpy()
        n = min(ref.shape[1], got.shape[1])
        same += int((ref[:, :n] == got[:, :n]).sum())
        total += ref.size
    return same / max(total, 1)


def measure(clips: int, corpus: Path, work: Path, device: str, workers: tp.Optional[int], hf_batch: int, smoke: bool,
            skip: tp.Dict[str, str], at_once: bool) -> tp.Dict[str, tp.Any]:
    """Make (or reuse) the corpus, run the implementations not in `skip` ({name: reason}), each in its own
    process: one after the other, or at once with the cores shared out (`at_once`, the smoke suite's
    plumbing check)."""
    import soundfile as sf
    import torch

    if smoke:
        clips = min(clips, 6)
    paths = make_corpus(corpus, clips, smoke)
    seconds = sum(sf.info(str(p)).duration for p in paths)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    checkpoint = work / "weights.th"
    torch.save(peers.random_state("24khz", seed=1), checkpoint)
    workers = workers if workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    # One after the other, unless the caller asks for them at once (the suite's smoke run: a
    # plumbing check, whose times then share the machine, its cores shared out).
    names = ("upstream", "ours", "ours, CUDA graphs", "transformers") if device.startswith("cuda") else (
        "upstream", "ours", "transformers")
    order = [which for which in names if which not in skip]
    together = at_once and len(order) > 1

    def start(which: str, threads: tp.Optional[tp.Dict[str, str]]) -> tp.Dict[str, tp.Any]:
        cmd = [sys.executable, "-m", "bench.child", "tokenize", which, str(corpus), str(work), str(checkpoint),
               device, str(workers), str(hf_batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(threads or {})})
        if proc.returncode:  # a peer that cannot run here (e.g. not installed): its reason, not a number
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            print(f"{which} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", file=sys.stderr)
            return {"error": (tail[-1] if tail else f"exit status {proc.returncode}")[:300]}
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        out["audio_hours_per_hour"] = seconds / out["wall_seconds"]
        return out
    results = {**dict(zip(order, map_processes(start, order, together))),
               **{which: {"error": why} for which, why in skip.items()}}
    if "error" not in results["upstream"]:
        for which in results:
            if which != "upstream" and "error" not in results[which]:
                results[which]["codes_equal_upstream"] = agreement(work, paths, which)
    return {"clips": len(paths), "audio_hours": seconds / 3600, "processes_at_once": len(order) if together else 1,
            "workers": workers, "results": results}


@benchmark("tokenize", "Corpus tokenization end to end (audio hours per hour), each implementation in its own process",
           priority=30)
def run(ctx: Context) -> None:
    clips = ctx.pick(2, 24, 200)
    _, left_out = ctx.in_own_process(("ours", "upstream", "transformers"))
    corpus = Path(os.environ.get("ENCODEC_FAST_BENCH_CORPUS", ctx.workdir / f"tokenize_corpus_{clips}"))
    try:
        # one decoding process on CPU outside the full suite (the cores are the encoder's); on CUDA the
        # command's default (CPU count - 1): the decoding must keep up with the GPU
        workers = 1 if ctx.suite != "full" and ctx.device == "cpu" else None
        report = measure(clips, corpus, ctx.workdir / "tokenize_work", ctx.device, workers,
                         hf_batch=8, smoke=ctx.suite == "smoke", skip={impl: SMOKE_LEFT_OUT for impl in left_out},
                         at_once=ctx.suite == "smoke")
    except SystemExit as err:  # the script's refusal (e.g. no espeak-ng for the speech clips): its reason
        for impl in ("ours", "upstream", "transformers"):
            ctx.na({"clips": clips, "model": "24khz", "device": ctx.device}, impl, "time", "s", str(err))
        return
    hours = report["audio_hours"]
    params = {"clips": report["clips"], "audio_hours": round(hours, 4), "model": "24khz", "kbps": 6.0,
              "device": ctx.device, "workers": report["workers"]}
    together = report["processes_at_once"]
    for impl, r in report["results"].items():
        if "error" in r:
            ctx.na(params, impl, "time", "s", r["error"])
            continue
        ctx.record(params, impl, "time", "s", [r["wall_seconds"]], audio_seconds=hours * 3600, headline=True,
                   note="one run, in its own process (ours: the encodec-fast tokenize command)" + (
                       f"; {side_by_side_note(together)}" if together > 1 else ""),
                   threads=r["threads"],
                   peak_rss_mb=r["peak_rss_mb"], peak_rss_worker_mb=r["peak_rss_worker_mb"],
                   **{k: r[k] for k in ("seconds_by_stage", "gpu_stages", "reading") if k in r})
        if "codes_equal_upstream" in r:
            ctx.record(params, impl, "codes_equal_upstream", "%", [100 * r["codes_equal_upstream"]],
                       higher_is_better=True)
