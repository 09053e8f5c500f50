"""Peak memory and time of the `encodec-fast` command on long files, against upstream's command.

    python -m bench.streaming_command [--minutes 1 10 60] [--models 24khz 48khz] [--impls ours upstream]
                                      [--memory-limit-gb 16] [--out DIR]

For each model (24 kHz mono, 48 kHz stereo; random weights with data-like codebooks, 6 kbps) and
length, a WAV at the model's rate is written block by block (`peers.signal` tones), then each
implementation compresses it to `.ecdc` and decompresses it back to WAV, each step in its own
process under an address-space limit (`--memory-limit-gb`), with its peak RSS (ru_maxrss of the
child) and wall time. Upstream's command is `python -m encodec` (0.1.1) in a process whose
`MODELS` give it the same weights, and whose audio I/O goes through soundfile (torchaudio >= 2.9
needs TorchCodec to read files): otherwise its own code. A run that dies (out of memory, the
limit) is recorded with its reason, never a number. Prints a markdown table; with --out, writes
DIR/streaming_command_<date>.json and .md with the machine. The suite (`python -m bench`,
benchmark `stream_command`) runs the same `measure` on shorter files.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

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


def run_step(cmd, limit_gb: float, timeout: float, env: tp.Optional[tp.Dict[str, str]] = None):
    """Run cmd under an address-space limit (and `env` added to the environment) -> (wall seconds,
    peak RSS MB, error or None)."""
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
                              preexec_fn=limit, cwd=ROOT, env={**os.environ, **(env or {})})
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


def measure(models: tp.Sequence[str], minutes: tp.Sequence[float], impls: tp.Sequence[str], limit_gb: float,
            timeout: float, workdir: Path, log: tp.Callable[[tp.Dict[str, tp.Any]], None] = lambda row: None,
            at_once: bool = False) -> tp.List[tp.Dict[str, tp.Any]]:
    """One row per (model, minutes, implementation, step): seconds, peak RSS (MB), or the error.
    `at_once`: the implementations run side by side (a plumbing check: their times then share the
    machine, its cores shared out: `bench.core.map_processes`), else one after the other."""
    import torch

    from bench.core import map_processes
    from bench.peers import random_state
    rows = []
    for model in models:
        ckpt = workdir / f"{model}.th"
        torch.save(random_state(model, seed=0), ckpt)
        for length in minutes:
            wav = workdir / f"in_{model}_{length:g}.wav"
            rate, channels = (24000, 1) if model == "24khz" else (48000, 2)
            write_input(wav, rate, channels, length)

            def steps(impl: str, env: tp.Optional[tp.Dict[str, str]]) -> tp.List[tp.Dict[str, tp.Any]]:
                return _steps(impl, model, length, wav, ckpt, workdir, limit_gb, timeout, log, env)
            for done in map_processes(steps, impls, at_once):
                rows += done
            wav.unlink()
    return rows


def _steps(impl: str, model: str, length: float, wav: Path, ckpt: Path, workdir: Path, limit_gb: float,
           timeout: float, log: tp.Callable[[tp.Dict[str, tp.Any]], None], env: tp.Optional[tp.Dict[str, str]]
           ) -> tp.List[tp.Dict[str, tp.Any]]:
    """One implementation's compress then decompress of `wav`: a row per step."""
    rows = []
    ecdc, back = workdir / f"{impl}.ecdc", workdir / f"{impl}_out.wav"
    for p in (ecdc, back):
        p.unlink(missing_ok=True)
    hq = ["--hq"] if model == "48khz" else []
    for step, (src, dst) in (("compress", (wav, ecdc)), ("decompress", (ecdc, back))):
        if impl == "ours":
            cmd = ["-m", "encodec_fast", str(src), str(dst), "--checkpoint", str(ckpt), "-b", "6", "-f", *hq]
        else:
            cmd = ["-c", UPSTREAM_CHILD, str(ckpt), f"encodec_{model}", str(src), str(dst), "-b", "6", "-f", *hq]
        if step == "decompress" and not ecdc.exists():
            wall, rss, err = None, None, "no .ecdc file (compress failed)"
        else:
            wall, rss, err = run_step([sys.executable, *cmd], limit_gb, timeout, env)
        rows.append({"model": model, "minutes": length, "impl": impl, "step": step, "seconds": wall,
                     "peak_rss_mb": rss if err is None else None, "error": err,
                     "realtime_x": (length * 60 / wall) if wall else None})
        log(rows[-1])
    for p in (ecdc, back):
        p.unlink(missing_ok=True)
    return rows


def table(rows: tp.Sequence[tp.Dict[str, tp.Any]]) -> str:
    lines = ["| model | minutes | step | ours: time (s) | ours: peak RSS (MB) | upstream: time (s) | "
             "upstream: peak RSS (MB) |", "|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["model"], r["minutes"], r["step"]) for r in rows))
    for model, length, step in keys:
        cells = []
        for impl in ("ours", "upstream"):
            r = next((r for r in rows if (r["model"], r["minutes"], r["step"], r["impl"]) ==
                      (model, length, step, impl)), None)
            if r is None:
                cells += ["—", "—"]
            elif r["error"]:
                cells += [f"n/a: {r['error'][:70]}", "n/a"]
            else:
                cells += [f"{r['seconds']:.1f}", f"{r['peak_rss_mb']:.0f}"]
        lines.append(f"| {model} | {length:g} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    parser.add_argument("--models", nargs="+", default=["24khz", "48khz"], choices=["24khz", "48khz"])
    parser.add_argument("--impls", nargs="+", default=["ours", "upstream"], choices=["ours", "upstream"])
    parser.add_argument("--memory-limit-gb", type=float, default=16.0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from bench import report
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        rows = measure(args.models, args.minutes, args.impls, args.memory_limit_gb, args.timeout, Path(tmp),
                       log=lambda row: print(json.dumps(row), flush=True))
    head = (f"The command on long files\n\n`python -m bench.streaming_command {' '.join(sys.argv[1:])}`; random "
            f"weights, 6 kbps, each step in its own process under a {args.memory_limit_gb:g} GB address-space limit; "
            "peak RSS is the process's maximum.\n\n")
    report.publish(head + table(rows), args.out, "streaming_command", args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
