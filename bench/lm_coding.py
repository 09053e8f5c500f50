"""LM-mode `.ecdc` compress and decompress, ours vs upstream encodec 0.1.1, on CPU in one run.

    python -m bench.lm_coding [--model 24khz|48khz] [--seconds 10] [--bandwidth 6] [--out bench/results]

The 24 kHz model and its LM with random weights (the official ones need a download; the LM's
heads scaled so that its distributions are peaked, like a trained LM's), the same weights on
both sides, 10 s of a synthetic voice-like signal. Upstream runs twice: with the process's
default thread count (as its command runs) and with one thread (as its tests run; the only
setting where its LM files come out the same on every machine setting). Ours always runs the LM
on one thread. Checks: our file's payload equals upstream's one-thread file, and each side
decodes the other's.
"""

import argparse
import importlib
import statistics
import sys
import time
import typing as tp
from pathlib import Path

import torch

import encodec_fast
from bench.report import machine, save
from encodec_fast.lm import lm_threads

ROOT = Path(__file__).resolve().parent.parent


def timed(fn: tp.Callable[[], tp.Any]) -> tp.Tuple[float, tp.Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--bandwidth", type=float, default=6.0)
    parser.add_argument("--model", choices=["24khz", "48khz"], default="24khz")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    report, md, ok = measure(args)
    print(md)
    save(args.out, f"lm_coding_{args.model}", report, md)
    assert ok
    return 0


def measure(args) -> tp.Tuple[tp.Dict[str, tp.Any], str, bool]:
    """(report with every run's seconds in 'all_runs', markdown, whether the checks passed)."""
    from encodec_fast.testing import lm_pair, make_model_pair, make_signal
    upc = importlib.import_module("encodec.compress")

    name = f"encodec_{args.model}"
    up, ours = make_model_pair(name, seed=1)
    up_lm, our_lm = lm_pair(32, 262, seed=5) if args.model == "24khz" else lm_pair(16, 525, seed=6)
    up.get_lm_model = lambda: up_lm
    ours.get_lm_model = lambda *a, **k: our_lm
    upc.MODELS[name] = lambda: up
    up.set_target_bandwidth(args.bandwidth)
    ours.set_target_bandwidth(args.bandwidth)
    wav = make_signal(ours.sample_rate, int(ours.sample_rate * args.seconds), ours.channels, seed=3)
    default_threads = torch.get_num_threads()
    times: tp.Dict[str, tp.List[float]] = {}

    def record(name: str, fn: tp.Callable[[], tp.Any]) -> tp.Any:
        seconds, out = timed(fn)
        times.setdefault(name, []).append(seconds)
        return out

    up_default = f"({default_threads} threads, default)"
    for rnd in range(args.rounds):  # interleaved: this VM's speed drifts between runs
        order = ("ours", "upstream") if rnd % 2 == 0 else ("upstream", "ours")
        for who in order:
            if who == "ours":
                ours_file = record("ours compress", lambda: encodec_fast.compress(ours, wav, use_lm=True))
                record("ours decompress", lambda: encodec_fast.decompress(ours_file, model=ours))
            else:
                up_file = record(f"upstream compress {up_default}", lambda: upc.compress(up, wav, use_lm=True))
                record(f"upstream decompress {up_default}", lambda: upc.decompress(up_file))
                with lm_threads(1):
                    up_file1 = record("upstream compress (1 thread)", lambda: upc.compress(up, wav, use_lm=True))
                    record("upstream decompress (1 thread)", lambda: upc.decompress(up_file1))
    rows = {k: statistics.median(v) for k, v in times.items()}
    with lm_threads(1):
        same_bytes = encodec_fast.compress(ours, wav, use_lm=True, checksum=False) == up_file1
        up_reads_ours, _ = upc.decompress(ours_file)
    ours_reads_up, _ = encodec_fast.decompress(up_file1, model=ours)
    plain_size = len(encodec_fast.compress(ours, wav))
    ratios = {k.replace("upstream ", "vs upstream "): v / rows["ours " + k.split()[1]]
              for k, v in rows.items() if k.startswith("upstream")}
    report = {**machine(), "threads": default_threads, "model": name, "seconds_of_audio": args.seconds,
              "bandwidth_kbps": args.bandwidth, "rounds": args.rounds, "seconds": rows, "all_runs": times,
              "speedups": ratios, "ours_equals_upstream_1_thread_without_crc": same_bytes,
              "lm_file_bytes": len(ours_file), "plain_file_bytes": plain_size}
    lines = [f"# LM-mode .ecdc, ours vs upstream ({report['date'][:10]})", "",
             f"CPU: {report['cpu']}, {default_threads} threads by default; torch {torch.__version__}; "
             f"{args.seconds:g} s, {name}, {args.bandwidth:g} kbps, random model and LM weights (same on both "
             f"sides); medians of {args.rounds} interleaved rounds. `python -m bench.lm_coding --model {args.model}`",
             "",
             "| run | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in rows.items()]
    lines += ["", "| ours faster than | × |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in ratios.items()]
    lines += ["", f"- our payload equals upstream's one-thread file (checksum off): {same_bytes}",
              f"- LM file {len(ours_file)} bytes, plain file {plain_size} bytes (a random LM predicts badly: "
              "no size gain is expected from it)"]
    md = "\n".join(lines) + "\n"
    return report, md, bool(same_bytes and up_reads_ours.shape == ours_reads_up.shape)


if __name__ == "__main__":
    sys.exit(main())
