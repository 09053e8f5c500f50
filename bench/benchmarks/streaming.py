"""Streaming (issue 16's measurements in the suite):

- `streaming`: the streaming encoder's and decoder's latency, compute per push and real-time
  factor on one thread (on the suite's device) at chunk sizes of 10-320 ms, and the low-latency
  mode's agreement with the whole-file codes, on the full-size 24 kHz model (random weights,
  data-like codebooks: the compute) and on the shipped small model's trained weights with
  held-out speech and music (the agreement: trained codebooks have near-ties where audio goes).
  The measuring code is bench/streaming_latency.py's.
- `stream_command`: the `encodec-fast` command on long files against upstream's command, each
  step in its own process under a memory limit: time and peak RSS (bench/streaming_command.py).
"""

import tempfile
import typing as tp
from pathlib import Path

import torch

from bench.core import Context, benchmark, side_by_side_note


@benchmark("streaming", "Streaming encoder / decoder: latency, compute per push, real-time factor (1 thread), "
           "low-latency code agreement", priority=45)
def streaming(ctx: Context) -> None:
    from bench import streaming_latency as sl
    chunks = ctx.pick([20, 320], [10, 20, 40, 80, 320], [10, 20, 40, 80, 320])
    seconds = ctx.pick(1.0, 10.0, 30.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for model_name, kinds in (("24khz", ("tones",)), ("small", ("speech", "music"))):
            model, weights = sl.load_model(model_name, None, ctx.device)
            model.set_target_bandwidth(6.0)
            for kind in kinds:
                base = {"model": model_name, "audio": kind, "kbps": 6.0, "device": ctx.device, "threads": 1}
                ctx.check_time(f"{model_name} on {kind}")
                x, missing = sl.load_audio(kind, model.sample_rate, seconds, ctx.device)
                if x is None:
                    ctx.na({**base, "part": "encoder"}, "ours", "codes_equal_whole_file", "%", missing)
                    continue
                for r in sl.measure(model, x, chunks):
                    params = {**base, "part": r["part"], "mode": r["mode"], "chunk_ms": round(r["chunk_ms"], 2)}
                    extra = dict(weights=weights, audio_seconds=r["audio_seconds"], pushes=r["pushes"])
                    ctx.record(params, "ours", "compute_per_push", "ms", [1000 * t for t in r["times_s"]], **extra)
                    ctx.record(params, "ours", "real_time_factor", "", [r["rtf"]],
                               note="compute time over audio time (< 1 keeps up)", **extra)
                    if r["latency_ms"] is not None:
                        ctx.record(params, "ours", "latency", "ms", [r["latency_ms"]], startup_ms=r["startup_ms"],
                                   note="algorithmic: a frame's last sample to the push that returns its codes, "
                                        f"after the first {sl.STARTUP_FRAMES} frames", **extra)
                    if "codes_equal" in r:
                        ctx.record(params, "ours", "codes_equal_whole_file", "%", [100 * r["codes_equal"]],
                                   higher_is_better=True, first_codebook=100 * r["codes_equal_first_codebook"],
                                   **extra)
    finally:
        torch.set_num_threads(threads)


@benchmark("stream_command", "The encodec-fast command on long files: time and peak memory (vs upstream's command)",
           priority=48, devices=("cpu",))
def stream_command(ctx: Context) -> None:
    from bench import streaming_command as sc
    from bench.benchmarks.scripts import _upstream_missing
    minutes = ctx.pick([0.05], [1.0], [1.0, 10.0, 60.0])
    models = ctx.pick(["24khz"], ["24khz"], ["24khz", "48khz"])
    missing = _upstream_missing()
    impls = ["ours"] + ([] if missing else ["upstream"])
    limit_gb = 16.0
    together = len(impls) if ctx.suite == "smoke" else 1  # the smoke run is a plumbing check: side by side
    with tempfile.TemporaryDirectory(prefix="stream-command-", dir=ctx.workdir) as tmp:
        for model in models:
            for length in minutes:
                ctx.check_time(f"{model}, {length:g} min")
                rows = sc.measure([model], [length], impls, limit_gb, timeout=max(120.0, 40 * 60 * length),
                                  workdir=Path(tmp), at_once=together > 1)
                for step in ("compress", "decompress"):
                    params = {"model": model, "minutes": length, "step": step, "kbps": 6.0, "device": "cpu"}
                    if missing:
                        ctx.na(params, "upstream", "time", "s", missing)
                    for r in (r for r in rows if r["step"] == step):
                        _record(ctx, params, r, headline=length == minutes[-1], limit_gb=limit_gb, together=together)


def _record(ctx: Context, params: tp.Dict[str, tp.Any], row: tp.Dict[str, tp.Any], headline: bool,
            limit_gb: float, together: int) -> None:
    impl = row["impl"]
    if row["error"]:
        for metric, unit in (("time", "s"), ("peak_memory", "MB")):
            ctx.na(params, impl, metric, unit, row["error"])
        return
    note = f"the command in its own process under a {limit_gb:g} GB address-space limit; random weights" + (
        f"; {side_by_side_note(together)}" if together > 1 else "")
    ctx.record(params, impl, "time", "s", [row["seconds"]], audio_seconds=60 * params["minutes"], headline=headline,
               note=note)
    ctx.record(params, impl, "peak_memory", "MB", [row["peak_rss_mb"]], memory="peak RSS of the process", note=note)
