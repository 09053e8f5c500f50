"""Peak memory and time of one long input: whole-file `encode` vs `encode_long`, and the
`encodec-fast tokenize` command on a long file.

    python bench/long_input_memory.py [--seconds 600] [--chunk 20] [--modes stream,whole,tokenize]
                                      [--model 24khz|48khz] [--rate 44100] [--channels 2] [--out DIR]

Each mode runs in its own process(es), random weights, 6 kbps:
- stream / whole: random audio at the model's rate in memory, `encode_long` or `encode`; the
  process's maximum RSS before and after encoding.
- tokenize: a FLAC of `--seconds` at `--rate` / `--channels` (gliding tones and noise, made
  block by block) through the command with 1 decoding worker; the peaks of the command's
  process tree (main, workers, and their sum) polled from /proc every 0.1 s.
Prints one JSON line per mode; with --out, also saves them (JSON and a markdown table, with the
machine) as DIR/long_input_memory_<date>.{json,md}. Checks nothing about codes (the tests do).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(mode: str, seconds: float, chunk: float) -> None:
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    from encodec_fast.streaming import encode_long
    from helpers import make_model_pair
    _, model = make_model_pair("encodec_24khz", seed=1)
    model.set_target_bandwidth(6.0)
    x = torch.randn(1, 1, int(24000 * seconds), generator=torch.Generator().manual_seed(0)).mul_(0.1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    frames = encode_long(model, x, chunk_seconds=chunk) if mode == "stream" else model.encode(x)
    wall = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "seconds": seconds, "chunk": chunk, "wall_s": wall, "frames": frames[0][0].shape[-1],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_encode_mb": before}))


def write_long_flac(path: Path, seconds: float, rate: int, channels: int) -> None:
    import numpy as np
    import soundfile as sf
    rng = np.random.default_rng(0)
    block = rate * 30
    with sf.SoundFile(str(path), "w", rate, channels, subtype="PCM_16") as f:
        for start in range(0, int(seconds * rate), block):
            n = min(block, int(seconds * rate) - start)
            t = (np.arange(n) + start) / rate
            tone = 0.2 * np.sin(2 * np.pi * (220 + 50 * np.sin(t / 7)) * t)
            gains = np.linspace(1.0, 0.7, channels)
            f.write((tone[:, None] * gains + 0.02 * rng.standard_normal((n, channels))).astype(np.float32))


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _tree(pid: int) -> list:
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            for child_pid in f.read().split():
                pids += _tree(int(child_pid))
    except OSError:
        pass
    return pids


def run_tokenize(args) -> dict:
    import torch

    from encodec_fast.model import EncodecModel
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        factory = EncodecModel.encodec_model_48khz if args.model == "48khz" else EncodecModel.encodec_model_24khz
        torch.save(factory(pretrained=False).state_dict(), tmp / "weights.pt")
        write_long_flac(tmp / "long.flac", args.seconds, args.rate, args.channels)
        cmd = [sys.executable, "-m", "encodec_fast", "tokenize", str(tmp / "long.flac"), "-o", str(tmp / "out"),
               "--model", args.model, "-b", "6", "--checkpoint", str(tmp / "weights.pt"), "--workers", "1", "--quiet"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env)
        peak_sum, peaks = 0.0, {}
        while proc.poll() is None:
            rss = {pid: _rss_mb(pid) for pid in _tree(proc.pid)}
            peak_sum = max(peak_sum, sum(rss.values()))
            for pid, mb in rss.items():
                peaks[pid] = max(peaks.get(pid, 0.0), mb)
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"tokenize failed with exit status {proc.returncode}")
    return {"mode": "tokenize", "model": args.model, "seconds": args.seconds, "rate": args.rate,
            "channels": args.channels, "wall_s": round(wall, 1), "x_real_time": round(args.seconds / wall, 1),
            "peak_rss_main_mb": round(peaks.get(proc.pid, 0.0)),
            "peak_rss_others_mb": sorted(round(v) for pid, v in peaks.items() if pid != proc.pid),
            "peak_rss_sum_mb": round(peak_sum)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--chunk", type=float, default=20.0)
    parser.add_argument("--modes", default="stream,whole,tokenize")
    parser.add_argument("--model", choices=["24khz", "48khz"], default="24khz", help="for the tokenize mode")
    parser.add_argument("--rate", type=int, default=44100, help="the long file's sample rate (tokenize mode)")
    parser.add_argument("--channels", type=int, default=2, help="the long file's channels (tokenize mode)")
    parser.add_argument("--out", type=Path, help="save the results here (e.g. bench/results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.seconds, args.chunk)
        return 0
    results = []
    for mode in args.modes.split(","):
        if mode == "tokenize":
            results.append(run_tokenize(args))
        else:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--seconds", str(args.seconds),
                                  "--chunk", str(args.chunk)], capture_output=True, text=True,
                                 env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        save_results(args, results)
    return 0


def save_results(args, results: list) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from report import machine, save
    info = machine()
    md = [f"# Long inputs: peak memory ({info['date'][:10]})", "",
          f"{info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}; random weights, 6 kbps. "
          f"`python bench/long_input_memory.py --modes {args.modes} --seconds {args.seconds:g} --chunk {args.chunk:g}"
          f" --model {args.model} --rate {args.rate} --channels {args.channels}`", "",
          "| mode | audio s | wall s | peak RSS MB (main) | other processes MB | sum MB |", "|---|---|---|---|---|---|"]
    for r in results:
        if r["mode"] == "tokenize":
            md.append(f"| tokenize ({r['model']}, {r['rate']} Hz x {r['channels']} FLAC) | {r['seconds']:g} | "
                      f"{r['wall_s']} | {r['peak_rss_main_mb']} | {r['peak_rss_others_mb']} | {r['peak_rss_sum_mb']} |")
        else:
            md.append(f"| {r['mode']} (in memory, {r['chunk']:g} s chunks) | {r['seconds']:g} | {r['wall_s']:.1f} | "
                      f"{r['peak_rss_mb']:.0f} | | |")
    stem = save(args.out, "long_input_memory", {**info, "args": {k: str(v) for k, v in vars(args).items()},
                                                "results": results}, "\n".join(md) + "\n")
    print(f"saved {stem}.json and .md", flush=True)


if __name__ == "__main__":
    sys.exit(main())
