"""The quantizer's training step on CPU: ours (scatter statistics, the default; upstream's one-hot
product, ENCODEC_FAST_VQ_STATS=onehot) against upstream `encodec`'s `core_vq`, interleaved in one
process with the same threads, weights and inputs.

    python -m bench.quantizer_cpu [--threads 2] [--batch 8] [--seconds 1] [--reps 7] [--out DIR]

Latents of a 24 kHz batch (75 frames per second, D=128, 1024 codes), 6 kbps (8 stages) and 24 kbps
(32 stages); forward (assignment, EMA update, straight-through output, commitment loss) and the
backward of a loss on the output. k-means init is off and the codebooks are set from the data,
so every step does the same work. Median and spread of --reps steps each; the ratio upstream/ours.
"""

import argparse
import copy
import os
import statistics
import sys
import time
import typing as tp
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def step(quantizer, x: torch.Tensor, n_q_bandwidth: float) -> None:
    xin = x.clone().requires_grad_(True)
    res = quantizer(xin, 75, n_q_bandwidth)
    (res.quantized.pow(2).mean() + res.penalty.sum()).backward()


def timed(fn, reps: int) -> list:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def measure(batch: int, seconds: float, reps: int) -> tp.List[tp.Dict[str, tp.Any]]:
    """Rows per bandwidth and implementation, every repetition in 'times_ms' (this process's threads)."""
    warnings.simplefilter("ignore")  # upstream's issue-25 warning on every training forward
    from encodec_fast import ops
    from encodec_fast.quantization import ResidualVectorQuantizer
    try:
        from encodec.quantization import ResidualVectorQuantizer as Upstream
    except ImportError:
        Upstream = None
    T = int(75 * seconds)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 128, T, generator=g)
    rows = []
    for kbps, n_q in ((6.0, 8), (24.0, 32)):
        torch.manual_seed(0)
        ours = ResidualVectorQuantizer(dimension=128, n_q=n_q, bins=1024, kmeans_init=False).train()
        with torch.no_grad():  # codebooks from the data (with replacement: fewer frames than codes)
            flat = x.transpose(1, 2).reshape(-1, 128)
            for layer in ours.vq.layers:
                idx = torch.randint(0, flat.shape[0], (1024,), generator=g)
                layer._codebook.embed.copy_(flat[idx] * 0.5)
                layer._codebook.embed_avg.copy_(layer._codebook.embed)
                layer._codebook.cluster_size.fill_(1.0)
                flat = flat * 0.7
        impls = {}
        for method in ("scatter", "onehot"):
            model = copy.deepcopy(ours)

            def run(model=model, method=method):
                os.environ["ENCODEC_FAST_VQ_STATS"] = method
                with ops.use_backend("torch"):
                    step(model, x, kbps)
            impls[f"ours ({method})"] = run
        if Upstream is not None:
            up = Upstream(dimension=128, n_q=n_q, bins=1024, kmeans_init=False).train()
            up.load_state_dict(ours.state_dict())
            impls["upstream encodec 0.1.1"] = lambda up=up: step(up, x, kbps)
        times = {name: [] for name in impls}
        for _ in range(reps):  # interleaved: each round runs every implementation once
            for name, fn in impls.items():
                times[name] += timed(fn, 1)
        for name, ts in times.items():
            rows.append({"kbps": kbps, "stages": n_q, "frames": batch * T, "implementation": name,
                         "median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "times_ms": ts})
        os.environ.pop("ENCODEC_FAST_VQ_STATS", None)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.batch, args.seconds, args.reps)
    upstream = {r["kbps"]: r["median_ms"] for r in rows if r["implementation"].startswith("upstream")}
    T = int(75 * args.seconds)
    lines = [f"Quantizer training step on CPU ({args.threads} threads, batch {args.batch} x {args.seconds} s "
             f"= {args.batch * T} frames, D=128, K=1024; median of {args.reps})", "",
             "| kbps | stages | implementation | median ms | min-max ms | upstream / this |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{upstream[r['kbps']] / r['median_ms']:.2f}x" if r["kbps"] in upstream
                 else "n/a (encodec not installed)")
        lines.append(f"| {r['kbps']} | {r['stages']} | {r['implementation']} | {r['median_ms']:.1f} | "
                     f"{r['min_ms']:.1f}-{r['max_ms']:.1f} | {ratio} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        from bench import report
        data = {"machine": report.machine(), "args": {**vars(args), "out": str(args.out)}, "rows": rows}
        stem = report.save(args.out, "quantizer_cpu", data, f"# {text}\n")
        print(f"saved {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
