"""Peak memory and time of the `encodec-fast` command on long files, against upstream's command.

    python bench/streaming_command.py [--minutes 1 10 60] [--models 24khz 48khz] [--impls ours upstream]
                                      [--memory-limit-gb 16] [--out DIR]

For each model (24 kHz mono, 48 kHz stereo; random weights with data-like codebooks, 6 kbps) and
length, a WAV at the model's rate is written block by block (`peers.signal` tones), then each
implementation compresses it to `.ecdc` and decompresses it back to WAV, each step in its own
process under an address-space limit (`--memory-limit-gb`), with its peak RSS (ru_maxrss of the
child) and wall time. Upstream's command is `python -m encodec` (0.1.1) in a process whose
`MODELS` give it the same weights, and whose audio I/O goes through soundfile (torchaudio >= 2.9
needs TorchCodec to read files): otherwise its own code. A run that dies (out of memory, the
limit) is recorded with its reason, never a number. Prints a markdown table; with --out, writes
DIR/streaming_command.json and .md with the machine.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

UPSTREAM_CHILD = r"""
import importlib, sys, torch, soundfile as sf, numpy as np
import encodec
upc = importlib.import_module("encodec.compress")  # the package exports a function of that name
upmain = importlib.import_module("encodec.__main__")
state = torch.load(sys.argv[1], map_location="cpu")
name = sys.argv[2]
def make():
    m = getattr(encodec.EncodecModel, "encodec_model_" + name.split("_")[1])(pretrained=False)
    m.load_state_dict(state)
    m.name = name
    return m.eval()
upc.MODELS[name] = make
def load(path):
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(data.T)), sr
def save_audio(wav, path, sample_rate, rescale=False):
    wav = wav.clamp(-0.99, 0.99)
    sf.write(str(path), wav.numpy().T, sample_rate, subtype="PCM_16")
upmain.torchaudio.load = load
upmain.save_audio = save_audio
sys.argv = ["encodec"] + sys.argv[3:]
with torch.no_grad():
    upmain.main()
"""


def write_input(path: Path, sample_rate: int, channels: int, minutes: float) -> None:
    import soundfile as sf

    from bench.peers import signal
    block = signal(sample_rate, 30.0, channels, batch=1, seed=3)[0].numpy().T
    total = int(minutes * 60 * sample_rate)
    with sf.SoundFile(str(path), "w", sample_rate, channels, subtype="PCM_16") as f:
        done = 0
        while done < total:
            n = min(block.shape[0], total - done)
            f.write(block[:n])
            done += n


def run_step(cmd, limit_gb: float, timeout: float):
    """Run cmd under an address-space limit -> (wall seconds, peak RSS MB, error or None)."""
    def limit():
        size = int(limit_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
    # ru_maxrss of RUSAGE_CHILDREN is the largest of all children so far: measure through a
    # wrapper that reports its own child's peak.
    wrapper = ("import resource, subprocess, sys\n"
               "p = subprocess.run(sys.argv[1:])\n"
               "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(p.returncode)\n")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, timeout=timeout,
                              preexec_fn=limit, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, None, f"did not finish within {timeout:.0f} s"
    wall = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    rss = next((int(ln.split()[1]) / 1024 for ln in reversed(lines) if ln.startswith("MAXRSS")), None)
    if proc.returncode != 0:
        tail = [ln for ln in lines if not ln.startswith("MAXRSS")]
        why = tail[-1] if tail else f"exit status {proc.returncode}"
        if "memory" in why.lower() or "alloc" in why.lower() or proc.returncode < 0:
            why = f"out of memory under a {limit_gb:g} GB limit ({why[:160]})"
        return None, rss, why[:240]
    return wall, rss, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    parser.add_argument("--models", nargs="+", default=["24khz", "48khz"], choices=["24khz", "48khz"])
    parser.add_argument("--impls", nargs="+", default=["ours", "upstream"], choices=["ours", "upstream"])
    parser.add_argument("--memory-limit-gb", type=float, default=16.0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    from bench.peers import random_state
    rows = []
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        tmp = Path(tmp)
        for model in args.models:
            name = f"encodec_{model}"
            rate, channels = (24000, 1) if model == "24khz" else (48000, 2)
            ckpt = tmp / f"{model}.th"
            torch.save(random_state(model, seed=0), ckpt)
            for minutes in args.minutes:
                wav = tmp / f"in_{model}_{minutes:g}.wav"
                write_input(wav, rate, channels, minutes)
                for impl in args.impls:
                    ecdc, back = tmp / f"{impl}.ecdc", tmp / f"{impl}_out.wav"
                    for p in (ecdc, back):
                        p.unlink(missing_ok=True)
                    hq = ["--hq"] if model == "48khz" else []
                    for step, (src, dst) in (("compress", (wav, ecdc)), ("decompress", (ecdc, back))):
                        if impl == "ours":
                            cmd = ["-m", "encodec_fast", str(src), str(dst), "--checkpoint", str(ckpt), "-b", "6",
                                   "-f", *hq]
                        else:
                            cmd = ["-c", UPSTREAM_CHILD, str(ckpt), name, str(src), str(dst), "-b", "6", "-f", *hq]
                        if step == "decompress" and not ecdc.exists():
                            wall, rss, err = None, None, "no .ecdc file (compress failed)"
                        else:
                            wall, rss, err = run_step([sys.executable, *cmd], args.memory_limit_gb, args.timeout)
                        row = {"model": model, "minutes": minutes, "impl": impl, "step": step, "seconds": wall,
                               "peak_rss_mb": rss if err is None else None, "error": err,
                               "realtime_x": (minutes * 60 / wall) if wall else None}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                    if impl == "ours" and ecdc.exists() and back.exists():
                        ecdc.unlink()
    context = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor() or
               platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(), "memory_limit_gb": args.memory_limit_gb,
               "command": "python bench/streaming_command.py " + " ".join(sys.argv[1:])}
    table = ["| model | minutes | step | ours: time (s) | ours: peak RSS (MB) | upstream: time (s) | "
             "upstream: peak RSS (MB) |", "|---|---|---|---|---|---|---|"]
    for model in args.models:
        for minutes in args.minutes:
            for step in ("compress", "decompress"):
                cells = []
                for impl in ("ours", "upstream"):
                    r = next((r for r in rows if (r["model"], r["minutes"], r["step"], r["impl"]) ==
                              (model, minutes, step, impl)), None)
                    if r is None:
                        cells += ["—", "—"]
                    elif r["error"]:
                        cells += [f"n/a: {r['error'][:70]}", "n/a"]
                    else:
                        cells += [f"{r['seconds']:.1f}", f"{r['peak_rss_mb']:.0f}"]
                table.append(f"| {model} | {minutes:g} | {step} | " + " | ".join(cells) + " |")
    print("\n".join(table))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "streaming_command.json").write_text(json.dumps({"context": context, "rows": rows}, indent=1))
        (args.out / "streaming_command.md").write_text(
            f"# The command on long files ({context['date']})\n\n`{context['command']}`; {context['cpu_count']} CPUs "
            f"({context['machine']}), torch {context['torch']}, random weights, 6 kbps, each step in its own process "
            f"under a {args.memory_limit_gb:g} GB address-space limit; peak RSS is the process's maximum.\n\n"
            + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
