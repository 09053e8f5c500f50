"""Ours vs upstream encodec 0.1.1 on CPU, same weights and inputs, one run.

    python bench/cpu_vs_upstream.py [--rounds 3] [--reps 2] [--out bench/results]

Workloads: 24 kHz encode and decode of a batch of 8 x 5 s (6 kbps); 48 kHz encode and decode of
1 x 10 s stereo (6 kbps). Each implementation runs in its own subprocess, with glibc's default
allocator and with the allocator tuning that the `encodec-fast` command applies
(`encodec_fast.cpu.tune_cpu_allocator`), so that the table separates what the code gains from
what the allocator setting gains. Prints medians, ratios and x real time; writes JSON + markdown.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {"24khz": (8, 1, 24000 * 5), "48khz": (1, 2, 48000 * 10)}


def worker(impl: str, tuned: bool, reps: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    if tuned:
        from encodec_fast.cpu import tune_cpu_allocator
        tune_cpu_allocator()
    from helpers import make_model_pair, make_signal

    out = {}
    for name, (batch, channels, length) in WORKLOADS.items():
        up, ours = make_model_pair(f"encodec_{name}", seed=0)
        model = ours if impl == "ours" else up
        del up, ours
        model.set_target_bandwidth(6.0)
        x = torch.stack([make_signal(model.sample_rate, length, channels, seed=b) for b in range(batch)])
        with torch.no_grad():
            frames = model.encode(x)
            model.decode(frames)
            enc, dec = [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                frames = model.encode(x)
                t1 = time.perf_counter()
                model.decode(frames)
                t2 = time.perf_counter()
                enc.append(t1 - t0)
                dec.append(t2 - t1)
        seconds = batch * length / model.sample_rate
        out[name] = {"encode_s": statistics.median(enc), "decode_s": statistics.median(dec),
                     "audio_s": seconds, "encode_all": enc, "decode_all": dec}
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=2, help="timed runs per worker, after a warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of workers")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "TUNED"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1] == "1", args.reps)))
        return

    # Interleaved rounds: this VM's speed drifts by +-20% over minutes, so each implementation
    # and allocator setting runs a few reps in every round, in alternating order, and the medians
    # are taken over all rounds.
    results: dict = {}
    for rnd in range(args.rounds):
        impls = ("upstream", "ours") if rnd % 2 == 0 else ("ours", "upstream")
        for tuned in (0, 1):
            for impl in impls:
                proc = subprocess.run([sys.executable, __file__, "--reps", str(args.reps), "--worker", impl, str(tuned)],
                                      capture_output=True, text=True, cwd=ROOT,
                                      env=dict(os.environ, PYTHONPATH=str(ROOT)))
                if proc.returncode:
                    sys.exit(proc.stderr)
                run = json.loads(proc.stdout.strip().splitlines()[-1])
                key = f"{impl}{'+tuned' if tuned else ''}"
                for name, entry in run.items():
                    acc = results.setdefault(key, {}).setdefault(name, {"audio_s": entry["audio_s"],
                                                                        "encode_all": [], "decode_all": []})
                    acc["encode_all"] += entry["encode_all"]
                    acc["decode_all"] += entry["decode_all"]
                print(f"round {rnd + 1}/{args.rounds}: {impl} tuned={tuned}", file=sys.stderr)
    for per_impl in results.values():
        for entry in per_impl.values():
            entry["encode_s"] = statistics.median(entry["encode_all"])
            entry["decode_s"] = statistics.median(entry["decode_all"])

    rows = []
    for name in WORKLOADS:
        for op in ("encode_s", "decode_s"):
            up = results["upstream"][name][op]
            up_t = results["upstream+tuned"][name][op]
            ours = results["ours"][name][op]
            ours_t = results["ours+tuned"][name][op]
            audio = results["ours"][name]["audio_s"]
            rows.append((f"{name} {op[:-2]}", up, up_t, ours, ours_t, up / ours_t, up_t / ours_t, up / ours,
                         audio / ours_t))
    header = ("| workload | upstream s | upstream+tuned s | ours s | ours+tuned s | ours+tuned vs upstream | "
              "same allocator (tuned) | same allocator (default) | ours+tuned x real time |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f}x | {r[6]:.2f}x | "
                     f"{r[7]:.2f}x | {r[8]:.1f}x |")
    table = "\n".join(lines)
    print(table)
    from report import machine, save
    meta = {**machine(), "reps": args.reps, "rounds": args.rounds,
            "workloads": {k: list(v) for k, v in WORKLOADS.items()}, "bandwidth_kbps": 6.0}
    save(args.out, "cpu_vs_upstream", {"meta": meta, "results": results},
         f"# CPU: encodec_fast vs encodec 0.1.1 ({meta['date']})\n\n"
         f"Machine: {meta['cpu']}, {meta['cpu_count']} cores, torch {meta['torch']}, "
         f"{meta['torch_threads']} threads. Medians of {args.rounds} interleaved rounds x {args.reps} runs (each after a "
         f"warm-up), 6 kbps, same random weights "
         f"(data-like codebooks) and inputs. 'tuned' = glibc allocator keeps freed memory "
         f"(`encodec_fast.cpu.tune_cpu_allocator`, applied by the `encodec-fast` command).\n\n{table}\n")


if __name__ == "__main__":
    main()
