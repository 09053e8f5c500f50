"""The standalone benchmark scripts of bench/ as benchmarks of the suite: each runs at the suite's
size and its rows become records of the common schema. The scripts keep their own command lines
(and their detailed tables) for focused work; the measuring code is the same function.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import typing as tp
from pathlib import Path

import torch

from bench.core import ROOT, SMOKE_LEFT_OUT, Context, benchmark, side_by_side_note


def _script(name: str):
    """The module bench/<name>.py, whose measuring function the benchmark calls."""
    import importlib
    return importlib.import_module(f"bench.{name}")


def _upstream_missing() -> tp.Optional[str]:
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import encodec  # noqa: F401
    except Exception as err:
        return f"encodec 0.1.1 cannot be imported ({type(err).__name__}: {err})"[:200]
    return None


@benchmark("tokenize", "Corpus tokenization end to end (audio hours per hour), each implementation in its own process",
           priority=30)
def tokenize(ctx: Context) -> None:
    mod = _script("tokenize_corpus")
    clips = ctx.pick(2, 24, 200)
    _, left_out = ctx.in_own_process(("ours", "upstream", "transformers"))
    corpus = Path(os.environ.get("ENCODEC_FAST_BENCH_CORPUS", ctx.workdir / f"tokenize_corpus_{clips}"))
    args = argparse.Namespace(clips=clips, corpus=corpus, skip={impl: SMOKE_LEFT_OUT for impl in left_out},
                              at_once=ctx.suite == "smoke",
                              work=ctx.workdir / "tokenize_work", device=ctx.device, workers=1 if ctx.suite != "full"
                              else None, hf_batch=8, smoke=ctx.suite == "smoke")
    try:
        report, _ = mod.measure(args)
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
                   peak_rss_mb=r["peak_rss_mb"], peak_rss_worker_mb=r["peak_rss_worker_mb"])
        if "codes_equal_upstream" in r:
            ctx.record(params, impl, "codes_equal_upstream", "%", [100 * r["codes_equal_upstream"]],
                       higher_is_better=True)


@benchmark("lm", "LM-mode .ecdc compress and decompress (vs upstream)", priority=50)
def lm(ctx: Context) -> None:
    params = {"model": "24khz", "seconds": ctx.pick(0.5, 5.0, 10.0), "kbps": 6.0, "device": "cpu"}
    missing = _upstream_missing()
    if missing:  # the script builds both sides from upstream's modules
        for op in ("compress", "decompress"):
            for impl in ("ours", "upstream"):
                ctx.na({**params, "op": op}, impl, "time", "s", missing)
        return
    mod = _script("lm_coding")
    args = argparse.Namespace(seconds=params["seconds"], bandwidth=6.0, model="24khz", rounds=ctx.pick(1, 2, 3))
    report, _, ok = mod.measure(args)
    for name, runs in report["all_runs"].items():
        op = name.split()[1]
        impl = ("ours" if name.startswith("ours") else "upstream (1 thread)" if "1 thread" in name else "upstream")
        ctx.record({**params, "op": op}, impl, "time", "s", runs, audio_seconds=params["seconds"], headline=True,
                   note="random model and LM weights; ours runs the LM on 1 thread, upstream on the process's "
                        "threads (its command) or 1; our payload equals upstream's 1-thread file: "
                        f"{report['ours_equals_upstream_1_thread_without_crc']}")
    if not ok:
        raise RuntimeError("LM coding: our file differs from upstream's one-thread file")


@benchmark("coder", "Arithmetic coder (C++) vs upstream's Python coder and constriction", priority=55)
def coder(ctx: Context) -> None:
    from encodec_fast.ops import arith
    params = {"alphabet": 1024, "symbols": ctx.pick(500, 5000, 20000), "device": "cpu"}
    missing = _upstream_missing() or (None if arith.cpp_available() else "the C++ coder is not built")
    if missing:
        ctx.na(params, "ours", "time_per_symbol", "us", missing)
        return
    mod = _script("coder")
    args = argparse.Namespace(symbols=params["symbols"], upstream_symbols=ctx.pick(100, 500, 1000),
                              rounds=ctx.pick(1, 3, 5))
    report, _ = mod.measure(args)
    for name, runs in report["all_runs"].items():
        op = "encode" if "encode" in name else "decode" if "decode" in name else "cdf"
        if name.startswith("ours (C++)"):
            impl = ("ours" if "from pdfs" in name else "ours (C++, CDFs given)" if "from CDFs" in name
                    else "ours (C++, CDF construction only)")
        else:
            impl = ("ours (Python reference)" if name.startswith("ours") else
                    "upstream" if name.startswith("upstream") else "constriction")
        ctx.record({**params, "op": op}, impl, "time_per_symbol", "us", [1e6 * r for r in runs],
                   headline=op != "cdf", note=name)


@benchmark("quantizer", "Quantizer training step (forward + backward + EMA) vs upstream's core_vq", priority=60)
def quantizer(ctx: Context) -> None:
    mod = _script("quantizer_cpu")
    batch, seconds = ctx.pick(1, 8, 8), ctx.pick(0.2, 1.0, 1.0)
    rows = mod.measure(batch, seconds, ctx.reps)
    for r in rows:
        impl = "upstream" if r["implementation"].startswith("upstream") else r["implementation"]
        ctx.record({"kbps": r["kbps"], "stages": r["stages"], "frames": r["frames"], "device": "cpu"}, impl, "time",
                   "ms",
                   r["times_ms"], headline=impl in ("ours (scatter)", "upstream"))


@benchmark("train_step", "One training step of the 24 kHz model (generator + discriminator) vs upstream's modules",
           priority=70)
def train_step(ctx: Context) -> None:
    mod = _script("train_step")
    params = {"model": "24khz", "batch": ctx.pick(1, 2, 8), "seconds": ctx.pick(0.25, 1.0, 1.0), "device": ctx.device}
    missing = _upstream_missing()
    if missing and ctx.device == "cpu":
        ctx.na(params, "upstream", "time", "s", missing)
    args = argparse.Namespace(threads=torch.get_num_threads(), batch=params["batch"], seconds=params["seconds"],
                              reps=ctx.pick(1, 2, 3), model="24khz", bandwidths=ctx.pick([6.0], [6.0], [6.0, 24.0]),
                              device=ctx.device, out=None)
    try:
        rows = mod.run(args)
    except ImportError as err:
        ctx.na(params, "ours", "time", "s", f"{type(err).__name__}: {err}")
        return
    for r in rows:
        impl = "upstream" if r["implementation"] == "upstream modules" else r["implementation"]
        ctx.record({**params, "kbps": r["kbps"]}, impl, "time", "s", [t / 1e3 for t in r["times_ms"]],
                   headline=impl in ("ours", "upstream", "ours (fp32)"), quantizer_share=r["quantizer_share"],
                   note="upstream = the same step built from upstream's SEANet, quantizer and MS-STFTD")


@benchmark("kernels", "Triton kernels vs their PyTorch paths, roofline fraction (bench/gpu.py)", priority=20,
           devices=("cuda",))
def kernels(ctx: Context) -> None:
    out = ctx.workdir / "gpu"
    stages = "correctness,rvq,conv,stft,conv2d,training"
    budget = max(0.0, ctx.time_left() - 60) if ctx.deadline is not None else None
    cmd = ["-m", "bench.gpu", "--stages", stages, "--out", str(out)]
    if ctx.suite != "full":
        cmd.append("--quick")
    if budget is not None:
        cmd += ["--budget-seconds", f"{budget:.0f}"]
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    found = sorted(out.glob("gpu_*.json"))
    if not found:
        ctx.na({"device": "cuda"}, "triton", "time", "ms", (proc.stderr or proc.stdout).strip()[-300:])
        return
    report = json.loads(found[-1].read_text())
    for stage in ("rvq", "conv", "stft", "conv2d", "training"):
        for row in report.get(stage, []):
            params = {k: v for k, v in row.items() if not k.endswith("_ms") and k not in (
                "launches", "speedup", "tflops", "gbs", "roofline_fraction", "rel_err", "frames_equal", "ties",
                "non_ties") and not isinstance(v, (list, dict))}
            params["stage"] = stage
            extra = {k: row[k] for k in ("speedup", "tflops", "gbs", "roofline_fraction", "rel_err", "frames_equal",
                                         "non_ties") if k in row}
            for impl, key in (("torch", "torch_ms"), ("triton", "triton_ms")):
                if row.get(key) is not None:
                    ctx.record(params, impl, "time", "ms", [row[key]], note="triton.testing.do_bench median", **extra)
    failed = [c for c in report.get("checks", []) if not c.get("ok")]
    for c in failed:
        ctx.na({"check": c["check"], "device": "cuda"}, "triton", "check", "", f"failed: {c.get('detail')}")
    for stage in report.get("stages_skipped", []):
        ctx.skipped.append(f"kernels: stage {stage} (bench/gpu.py budget)")


@benchmark("ops", "The ops' PyTorch reference paths (pytest-benchmark: bench/test_ops_reference_cpu.py)", priority=80,
           devices=("cpu",))
def ops(ctx: Context) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ops.json"
        limits = ctx.pick(["--benchmark-min-rounds=1", "--benchmark-max-time=0.05", "--benchmark-warmup=off"],
                          ["--benchmark-min-rounds=5", "--benchmark-max-time=1"], ["--benchmark-min-rounds=10"])
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "bench/test_ops_reference_cpu.py", "--benchmark-only", f"--benchmark-json={path}",
                               "--benchmark-save-data", *limits], capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if proc.returncode or not path.exists():
            ctx.na({"device": "cpu"}, "torch", "time", "ms", (proc.stdout + proc.stderr).strip()[-300:])
            return
        data = json.loads(path.read_text())
    for bench in data["benchmarks"]:
        stats = bench["stats"]
        reps = [1e3 * t for t in stats.get("data") or [stats["median"]]]
        ctx.record({"op": bench["name"].split("[")[0], **(bench.get("params") or {}), "device": "cpu"}, "torch",
                   "time", "ms", reps, note="pytest-benchmark (reference path)")

