"""Time the Triton kernels over a grid of launch configurations on one GPU: the data behind the
defaults in the kernel wrappers and the autotuning lists.

    python -m tools.gpu_sweep [--only rvq_encode,vq_assign,conv] [--budget-seconds S] [--out DIR]
    TRITON_INTERPRET=1 python -m tools.gpu_sweep --smoke   # tiny shapes on CPU (plumbing only)

Each configuration is forced through `encodec_fast.kernels.tuning.launch` (every wrapper launches
through it), checked against the first configuration's output (RVQ codes equal, or ties only;
convolutions within 1e-5 relative in fp32), timed with `triton.testing.do_bench` (median), and
recorded with the compiled kernel's registers and local memory. The JSON and a markdown table are
rewritten after every kernel, so a time limit keeps what was measured.
"""

import argparse
import contextlib
import datetime
import itertools
import json
import os
import sys
import time
import typing as tp
from pathlib import Path

import torch

from bench.benchmarks import kernels as gpu  # sizes, test data, launch records
from bench.core import context
from encodec_fast import ops
from encodec_fast.ops import rvq

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def forced(config: tp.Dict[str, int]):
    """Every kernel launch inside takes these block sizes / num_warps / num_stages (where the
    kernel has them) instead of its default; autotuning is off."""
    from encodec_fast.kernels import tuning
    original = tuning.launch

    def launch(kernel, grid, args, constants, default, *rest, **kw):
        blocks = {k: config.get(k, v) for k, v in default.kwargs.items()}
        cfg = tuning.config(blocks, config.get("num_warps", default.num_warps),
                            config.get("num_stages", default.num_stages))
        return original(kernel, grid, args, constants, cfg)
    old = os.environ.pop("ENCODEC_FAST_AUTOTUNE", None)
    tuning.launch = launch
    try:
        yield
    finally:
        tuning.launch = original
        if old is not None:
            os.environ["ENCODEC_FAST_AUTOTUNE"] = old


def grid(**axes) -> tp.List[tp.Dict[str, int]]:
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def sweep_rvq_encode(device: str, smoke: bool) -> list:
    B, T = gpu.SIZES["rvq"]
    D, K, Q = (128, 1024, 8) if not smoke else (16, 64, 2)
    books = gpu.make_books(Q, K, D, seed=Q, device=device)
    x = gpu.make_latents(books, B, T, seed=Q)
    embeds, norms = list(books), [b.pow(2).sum(-1)[None] for b in books]
    stacked = (books.contiguous(), torch.stack([n.view(-1) for n in norms]))
    configs = grid(BLOCK_N=(32, 64, 128), BLOCK_K=(32, 64, 128), num_warps=(4, 8), num_stages=(3,))
    configs += [dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=s) for s in (1, 2, 4)]
    if smoke:
        configs = configs[:3]
    rows = []
    flops = 2.0 * B * T * K * D * Q
    with ops.use_backend("torch"):
        ref = rvq.rvq_encode(x, embeds, norms)
        torch_ms = gpu.bench_ms(lambda: rvq.rvq_encode(x, embeds, norms), True)
    searches = [("exact", lowp) for lowp in rvq.LOW_PRECISION] + [("ieee", ""), ("tf32", "")]
    for precision, lowp in searches:
        for cfg in configs:
            fn = lambda: rvq.rvq_encode(x, embeds, norms, stacked=lambda: stacked)  # noqa: E731
            row = {"kernel": "rvq_encode", "shape": f"N={B * T} D={D} K={K} Q={Q}",
                   "precision": f"{precision}/{lowp}" if lowp else precision, "config": cfg, "torch_ms": torch_ms}
            try:
                with forced(cfg), ops.use_backend("triton"), gpu.Precision(precision), \
                        gpu.EnvSetting("ENCODEC_FAST_RVQ_CERTIFY_WITH", lowp or None):
                    got = fn()
                    row["ms"] = gpu.bench_ms(fn, True)
                    row["launches"] = gpu.LaunchLog.of(fn)
                agreement = rvq.code_agreement(x, books, ref, got)
                row.update(tflops=flops / row["ms"] / 1e9, frames_equal=agreement.equal / agreement.rows,
                           non_ties=agreement.non_ties)
            except Exception as exc:  # a configuration that does not compile is a result
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def sweep_vq_assign(device: str, smoke: bool) -> list:
    B, T = gpu.SIZES["train"]
    D, K = (128, 1024) if not smoke else (16, 64)
    books = gpu.make_books(1, K, D, seed=3, device=device)
    x = gpu.make_latents(books, B, T, seed=3)[:, :, :].transpose(1, 2).reshape(-1, D).contiguous()
    norm = books[0].pow(2).sum(-1)
    configs = grid(BLOCK_N=(16, 32, 64, 128), BLOCK_K=(32, 64, 128), num_warps=(4, 8), num_stages=(3,))
    if smoke:
        configs = configs[:3]
    rows = []
    with ops.use_backend("torch"):
        ref = rvq.vq_assign(x, books[0], norm, stats=True)
    for dtype in (torch.float32,):  # the quantizer trains in fp32 (under autocast too)
        xd = x.to(dtype)
        for cfg in configs:
            fn = lambda: rvq.vq_assign(xd, books[0], norm, stats=True)  # noqa: E731
            row = {"kernel": "vq_assign", "shape": f"N={x.shape[0]} D={D} K={K} stats", "precision": "ieee",
                   "dtype": str(dtype).replace("torch.", ""), "config": cfg}
            try:
                with forced(cfg), ops.use_backend("triton"):
                    got = fn()
                    row["ms"] = gpu.bench_ms(fn, True)
                    row["launches"] = gpu.LaunchLog.of(fn)
                if dtype == torch.float32:
                    agreement = rvq.code_agreement(x.t()[None], books, ref[0].view(1, 1, -1), got[0].view(1, 1, -1))
                    row.update(frames_equal=agreement.equal / agreement.rows, non_ties=agreement.non_ties)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def sweep_conv(device: str, smoke: bool, deadline: float) -> list:
    """Each SEANet layer of gpu.CONV_LAYERS (batch 64 x 10 s), fp32 and bf16, over a grid."""
    configs = grid(BLOCK_CO=(32, 64, 128), BLOCK_CI=(16, 32), BLOCK_T=(128, 256), num_warps=(4, 8),
                   num_stages=(1,))
    if smoke:
        configs = configs[:2]
    rows = []
    for dtype, layer in itertools.product((torch.float32, torch.bfloat16), gpu.CONV_LAYERS):
        if True:
            if time.perf_counter() > deadline:
                return rows
            fn, ref_fn, name, flops, *_ = gpu.conv_case(device, layer, dtype)
            with torch.no_grad():
                ref = ref_fn()
                torch_ms = gpu.bench_ms(ref_fn, True)
            for cfg in configs:
                if time.perf_counter() > deadline:
                    return rows
                cfg = dict(cfg)
                cfg["BLOCK_J"] = cfg["BLOCK_P"] = cfg["BLOCK_T"]
                row = {"kernel": "conv", "layer": name, "dtype": str(dtype).replace("torch.", ""),
                       "config": {k: v for k, v in cfg.items() if k not in ("BLOCK_J", "BLOCK_P")},
                       "torch_ms": torch_ms}
                try:
                    with forced(cfg), ops.use_backend("triton"), torch.no_grad():
                        got = fn()
                        row["ms"] = gpu.bench_ms(fn, True)
                        row["launches"] = gpu.LaunchLog.of(fn)
                    row["rel_err"] = float((got.float() - ref.float()).abs().max()
                                           / ref.float().abs().max().clamp_min(1e-12))
                    row["tflops"] = flops / row["ms"] / 1e9
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(report: dict) -> str:
    lines = [f"# Launch-configuration sweep ({report['date']})", "",
             f"Device: {report['device']}; torch {report['torch']}, triton {report['triton']}. "
             "Median ms (do_bench); floor = the roofline of the launches on this GPU (bench/launch_roofline.py: "
             "FLOP at the dense peak of the products' precision or bytes at HBM bandwidth, the slower); local = "
             "local memory per thread (spills and stack) as the driver reports it. Best first within each group.",
             ""]
    groups: tp.Dict[tp.Tuple[str, ...], list] = {}
    for r in report["rows"]:
        key = (r["kernel"], r.get("layer", r.get("shape", "")), r.get("dtype", "float32"), r.get("precision", ""))
        groups.setdefault(key, []).append(r)
    for (kernel, what, dtype, precision), rows in groups.items():
        ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
        torch_ms = rows[0].get("torch_ms")
        lines += [f"## {kernel} {what} {dtype} {precision}" + (f" (torch {torch_ms:.3f} ms)" if torch_ms else ""), "",
                  "| config | ms | vs torch | floor ms | regs | local B | check |", "|---|---|---|---|---|---|---|"]
        for r in ok:
            launch = (r.get("launches") or [{}])[0]
            check = (f"{r['frames_equal']:.4f} equal, {r['non_ties']} non-ties" if "frames_equal" in r
                     else f"{r['rel_err']:.1e} rel." if "rel_err" in r else "-")
            vs = f"{torch_ms / r['ms']:.2f}x" if torch_ms else "-"
            floor = gpu.predicted_ms(r.get("launches") or [], report["device"])
            lines.append(f"| {' '.join(f'{k}={v}' for k, v in r['config'].items())} | {r['ms']:.3f} | {vs} | "
                         f"{'-' if floor is None else f'{floor:.3f}'} | "
                         f"{launch.get('registers', '-')} | {launch.get('local_bytes', '-')} | {check} |")
        for r in rows:
            if "error" in r:
                lines.append(f"| {' '.join(f'{k}={v}' for k, v in r['config'].items())} | failed | | | | | "
                             f"{r['error'][:80]} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="rvq_encode,vq_assign,conv")
    parser.add_argument("--budget-seconds", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        gpu.use_interpreter(True)
    elif not torch.cuda.is_available():
        print("tools/gpu_sweep.py needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    gpu.LaunchLog.install()
    from encodec_fast import precision
    with precision.torch_precision("exact"):  # TF32 off for the whole run (the exact fp32 reference)
        return _sweep(args, parser)


def _sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import triton
    device = "cpu" if args.smoke else "cuda"
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": "CPU (smoke)" if args.smoke else torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__, "context": context(device), "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_sweep_{datetime.date.today().isoformat()}" + ("_smoke" if args.smoke else "")
    deadline = time.perf_counter() + args.budget_seconds
    for name in args.only.split(","):
        if time.perf_counter() > deadline:
            break
        if name == "rvq_encode":
            report["rows"] += sweep_rvq_encode(device, args.smoke)
        elif name == "vq_assign":
            report["rows"] += sweep_vq_assign(device, args.smoke)
        elif name == "conv":
            report["rows"] += sweep_conv(device, args.smoke, deadline)
        else:
            parser.error(f"unknown sweep {name}")
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
        (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
