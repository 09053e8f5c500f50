"""One long file (an hour in the full suite) encoded at once: peak memory and time, ours (the
bounded-memory chunked encoder, `encodec_fast.streaming.encode_long`, same codes as whole-file
`encode`) against upstream's and transformers' whole-file `encode`. Each implementation runs in a
fresh process under an address-space limit (CPU), so a peer that runs out of memory is recorded as
n/a with the limit instead of taking the machine down. Decoding long files in bounded memory is
the streaming issue's work; it is not measured here.
"""

import gc
import json
import os
import time

import torch

from bench import peers
from bench.core import (
    SMOKE_LEFT_OUT,
    Context,
    benchmark,
    hwm_mb,
    map_processes,
    memory_reason,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
    run_child,
    side_by_side_note,
    trim_heap,
)
from encodec_fast.testing import voice_batch


def memory_limit_gb() -> float:
    """70% of this machine's memory, at most 16 GB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        total = 16.0
    return round(min(16.0, 0.7 * total), 1)


@benchmark("long_file", "One long file: peak memory and time of encoding it (vs whole-file upstream, transformers)",
           priority=40)
def run(ctx: Context) -> None:
    seconds = ctx.pick(2.0, 300.0, 3600.0)
    model = "24khz"
    state, source = peers.load_state(model, None)
    path = ctx.workdir / "long_file_state.pt"
    torch.save(state, path)
    limit = memory_limit_gb() if ctx.device == "cpu" else None
    params = {"model": model, "op": "encode", "batch": 1, "seconds": seconds, "device": ctx.device}
    ctx.check_time(f"{seconds:g} s")

    impls, left_out = ctx.in_own_process(peers.IMPLS)
    for impl in left_out:
        for metric, unit in (("time", "s"), ("peak_memory", "MB")):
            ctx.na(params, impl, metric, unit, SMOKE_LEFT_OUT)
    # One at a time (each may take most of the machine's memory), except in the smoke suite.
    together = ctx.suite == "smoke" and len(impls) > 1

    def one(impl: str, env):
        return run_child(["-m", "bench.child", "long_file", impl, model, str(path), str(seconds), ctx.device],
                         timeout=max(120.0, min(4 * 3600.0, ctx.time_left() + 120)), memory_limit_gb=limit, env=env)
    outcomes = map_processes(one, impls, together)
    for impl, (out, reason) in zip(impls, outcomes):
        how = "chunked (encode_long)" if impl == "ours" else "whole file"
        if out is None or "error" in out:
            why = (out or {}).get("error") or reason
            if limit and "memory" in why and "limit" not in why:
                why = why.replace("out of memory", f"out of memory under a {limit:g} GB limit", 1)
            for metric, unit in (("time", "s"), ("peak_memory", "MB")):
                ctx.na(params, impl, metric, unit, why)
            continue
        ctx.record(params, impl, "time", "s", [out["seconds"]], audio_seconds=seconds, how=how, weights=source,
                   headline=ctx.suite != "smoke",
                   note=side_by_side_note(len(impls)) if together else "one run, in its own process")
        ctx.record(params, impl, "peak_memory", "MB", [out["peak_over_baseline_mb"]], how=how,
                   process_peak_mb=out["peak_mb"], memory_limit_gb=limit,
                   memory="cuda max allocated" if ctx.device == "cuda" else
                   "CPU: peak RSS during the call minus RSS before it (model loaded, input in memory, free heap "
                          "returned first), own process")


def child(impl: str, model: str, state_path: str, seconds: str, device: str) -> None:
    """One implementation on one long input in this (fresh) process; prints one JSON line."""
    seconds = float(seconds)
    from encodec_fast import cpu
    cpu.tune_cpu_allocator()
    try:
        codec = peers.build(impl, model, torch.load(state_path), device)
    except peers.Unavailable as err:
        print(json.dumps({"error": str(err)}))
        return
    warm = voice_batch(codec.sample_rate, 0.1, codec.channels).to(device)
    codec.encode(warm, 6.0)  # one-time costs (thread pools, lazy imports) are not the long file's
    x = voice_batch(codec.sample_rate, seconds, codec.channels).to(device)
    # Making the input leaves freed heap behind (the tuned allocator keeps it): hand it back, so
    # that the call's peak is new pages, not pages it reuses.
    gc.collect()
    trim_heap()
    exact = reset_peak_rss()
    baseline = rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline_cuda = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    try:
        if impl == "ours":
            from encodec_fast.streaming import encode_long
            codec.net.set_target_bandwidth(6.0)
            with torch.no_grad():
                encode_long(codec.net, x)
        else:
            codec.encode(x, 6.0)
        if device == "cuda":
            torch.cuda.synchronize()
    except (RuntimeError, MemoryError) as err:
        text = f"{type(err).__name__}: {err}"
        print(json.dumps({"error": memory_reason(text)
                          if "memory" in str(err).lower() or isinstance(err, MemoryError) else text[:300]}))
        return
    wall = time.perf_counter() - t0
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - baseline_cuda) / 2 ** 20
        process_peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        process_peak = hwm_mb() if exact else peak_rss_mb()
        peak = process_peak - baseline
    print(json.dumps({"seconds": wall, "peak_over_baseline_mb": peak, "peak_mb": process_peak}))

