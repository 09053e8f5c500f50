"""Encode and decode throughput of the 24 kHz and 48 kHz models over batch size, clip length and
bandwidth, ours against upstream `encodec` 0.1.1 and transformers' EncodecModel on the same
weights and inputs; the codes' agreement and the decoded audio's difference with upstream's; the
peak memory of every case.

Timing: all implementations in this process (same threads, same allocator setting), one warm-up
each, then interleaved rounds. Memory: on CPU, one fresh process per model (`python -m
bench.child codec ...`) running each implementation in turn: for each case, the peak RSS during
the call (the kernel's VmHWM, reset just before it) minus the RSS just before it (inputs made,
models loaded, one tiny warm-up call done), with glibc set to return freed memory so that every
case starts from the same RSS. On CUDA: torch.cuda.max_memory_allocated over the call, in this process.

On CUDA, like for like: ours in each precision mode (`ours exact`, `ours tf32`, `ours bf16`,
`ours fp16`; `encodec_fast.precision`), the same model on the PyTorch path in the same mode
(`torch <mode>`: cuDNN and cuBLAS with the mode's TF32 switches, bf16 / fp16 autocast), that path under
`torch.compile(mode="max-autotune")` (`torch.compile <mode>`; the quick suite: default mode, bf16
only, on the headline case), and upstream and transformers as torch
is configured (their records carry the settings). Agreement: with upstream's codes on the same GPU,
and with the CPU fp32 codes of the first two clips (`codes_equal_cpu_fp32`).
"""

import json
import typing as tp

import torch

from bench import peers
from bench.core import (
    SMOKE_LEFT_OUT,
    Context,
    benchmark,
    hwm_mb,
    release_freed_memory,
    reset_peak_rss,
    rss_mb,
    run_child,
)
from encodec_fast.testing import voice_batch

# (model, batch, seconds, kbps) per suite; sweeps share the base case.
BASE = {"smoke": {"24khz": (1, 0.25, 6.0), "48khz": (1, 0.5, 6.0)},
        "quick": {"24khz": (1, 1.0, 6.0), "48khz": (1, 1.0, 6.0)},
        "full": {"24khz": (1, 5.0, 6.0), "48khz": (1, 5.0, 6.0)}}
SWEEPS = {
    "smoke": {"24khz": {"batch": [1, 2], "seconds": [0.25, 0.5], "kbps": [24.0]},
              "48khz": {"batch": [1], "seconds": [0.5, 1.2], "kbps": [6.0]}},
    "quick": {"24khz": {"batch": [1, 8, 32, 64], "seconds": [1.0, 5.0, 30.0], "kbps": [1.5, 6.0, 24.0]},
              "48khz": {"batch": [1, 8], "seconds": [1.0, 5.0], "kbps": [3.0, 24.0]}},
    "full": {"24khz": {"batch": [1, 8, 32, 64], "seconds": [1.0, 5.0, 30.0, 300.0], "kbps": [1.5, 3.0, 6.0, 12.0,
                                                                                             24.0]},
             "48khz": {"batch": [1, 8, 32, 64], "seconds": [1.0, 5.0, 30.0, 300.0], "kbps": [3.0, 6.0, 12.0, 24.0]}},
}
# Cases shown in the report's headline table (suite -> model -> (batch, seconds, kbps)).
HEADLINE = {"smoke": {"24khz": (2, 0.25, 6.0), "48khz": (1, 1.2, 6.0)},
            "quick": {"24khz": (8, 1.0, 6.0), "48khz": (1, 5.0, 6.0)},
            "full": {"24khz": (32, 5.0, 6.0), "48khz": (8, 5.0, 6.0)}}


# On CUDA the quick and full suites time the batch a corpus job runs (64 x 10 s at 24 kHz, the
# issue tracker's and docs' reference case), its 24 kbps twin and one clip alone (latency), then the
# 48 kHz model; a GPU lease is minutes, so no sweep.
GPU_CASES = {"24khz": [(64, 10.0, 6.0), (64, 10.0, 24.0), (1, 10.0, 6.0)], "48khz": [(8, 10.0, 6.0)]}


def headline_case(suite: str, model: str, device: str = "cpu") -> tp.Tuple[int, float, float]:
    if device == "cuda" and suite != "smoke":
        return GPU_CASES[model][0]
    return HEADLINE[suite][model]


def cases(suite: str, model: str, device: str = "cpu") -> tp.List[tp.Tuple[int, float, float]]:
    """Every (batch, seconds, kbps) of the suite for `model`, smallest work first (on CUDA: the
    headline first, see GPU_CASES)."""
    if device == "cuda" and suite != "smoke":
        return list(GPU_CASES[model])
    batch0, seconds0, kbps0 = BASE[suite][model]
    sweep = SWEEPS[suite][model]
    out = {(b, seconds0, kbps0) for b in sweep["batch"]}
    out |= {(batch0, s, kbps0) for s in sweep["seconds"]}
    out |= {(batch0, seconds0, k) for k in sweep["kbps"]}
    out.add(HEADLINE[suite][model])
    return sorted(out, key=lambda c: (c[0] * c[1], c[2]))


def _params(model: str, op: str, batch: int, seconds: float, kbps: float, device: str) -> tp.Dict[str, tp.Any]:
    return {"model": model, "op": op, "batch": batch, "seconds": seconds, "kbps": kbps, "device": device}


@benchmark("codec",
           "Encode / decode throughput and memory over batch, length and bandwidth (vs upstream, transformers)",
           priority=10)
def run(ctx: Context) -> None:
    for model in ("24khz", "48khz"):
        state, source = peers.load_state(model, None)
        codecs: tp.Dict[str, tp.Any] = peers.build_all(model, state, device=ctx.device)
        ours = codecs["ours"]
        cpu_reference = None
        if ctx.device == "cuda":  # each precision mode, like for like (see the module docstring)
            # max-autotune compiles for minutes per mode and shape: the full suite only; the
            # quick suite compiles (default mode) in bf16 only, the fastest mode, the others n/a
            codecs = {**peers.gpu_variants(codecs.pop("ours"), ctx.pick("default", "default", "max-autotune"),
                                           modes=ctx.pick(("bf16",), ("bf16",), None)), **codecs}
            cpu_reference = peers.build("ours", model, state, "cpu")
        for batch, seconds, kbps in cases(ctx.suite, model, ctx.device):
            ctx.check_time(f"{model} batch {batch} x {seconds:g} s at {kbps:g} kbps")
            headline = (batch, seconds, kbps) == headline_case(ctx.suite, model, ctx.device)
            x = voice_batch(ours.sample_rate, seconds, ours.channels, batch=batch).to(ctx.device)
            audio_s = batch * seconds
            extra = dict(audio_seconds=audio_s, weights=source, headline=headline)
            sync = torch.cuda.synchronize if ctx.device == "cuda" else (lambda: None)
            live = {name: c for name, c in codecs.items() if isinstance(c, peers.Codec)}
            for name, c in codecs.items():
                if not isinstance(c, peers.Codec):
                    for op in ("encode", "decode"):
                        ctx.na(_params(model, op, batch, seconds, kbps, ctx.device), name, "time", "s", str(c))
            if not headline:  # torch.compile compiles (and autotunes) again for every new shape: minutes each
                for name in [n for n in live if n.startswith("torch.compile")]:
                    del live[name]
                    for op in ("encode", "decode"):
                        ctx.na(_params(model, op, batch, seconds, kbps, ctx.device), name, "time", "s",
                               "timed on the headline case only (it compiles and autotunes again for every shape)")
            timed = ctx.timed(_params(model, "encode", batch, seconds, kbps, ctx.device),
                              {name: (lambda c=c: c.encode(x, kbps)) for name, c in live.items()}, sync=sync,
                              **extra)
            _settings(timed, live)
            encoded = {}
            for name, c in live.items():
                try:
                    encoded[name] = c.encode(x, kbps)
                except Exception as err:  # recorded as n/a by timed(); nothing to decode
                    ctx.na(_params(model, "decode", batch, seconds, kbps, ctx.device), name, "time", "s",
                           f"encode failed: {type(err).__name__}: {err}"[:300])
            timed = ctx.timed(_params(model, "decode", batch, seconds, kbps, ctx.device),
                              {name: (lambda c=live[name], e=e: c.decode(e)) for name, e in encoded.items()},
                              sync=sync, **extra)
            _settings(timed, live)
            _agreement(ctx, live, encoded, _params(model, "encode", batch, seconds, kbps, ctx.device))
            if cpu_reference is not None:
                _agreement_with_cpu(ctx, live, encoded, cpu_reference, x, kbps,
                                    _params(model, "encode", batch, seconds, kbps, ctx.device))
            if ctx.device == "cuda":
                _cuda_memory(ctx, live, x, kbps, _params(model, "", batch, seconds, kbps, ctx.device))
        if ctx.device == "cuda" and model == "24khz":
            _ragged(ctx, ours.net, source)
        del codecs
        if model == "24khz":
            _mode_agreement(ctx)
        if ctx.device == "cpu" and (ctx.suite != "smoke" or model == "24khz"):
            _cpu_memory(ctx, model, state, source)
        elif ctx.device == "cpu":  # the smoke suite checks the memory process on one model, to stay short
            for case in cases(ctx.suite, model):
                for op in ("encode", "decode"):
                    for impl in peers.IMPLS:
                        ctx.na(_params(model, op, *case, "cpu"), impl, "peak_memory", "MB",
                               "the smoke suite measures memory on the 24 kHz model only")


#: The ragged case (CUDA): clips of 1-20 s, log-uniform, as a corpus gives them.
RAGGED_CLIPS = 64
RAGGED_SECONDS = (1.0, 20.0)


def _ragged(ctx: Context, net: tp.Any, source: str) -> None:
    """`encode_batch` on clips of different lengths, per precision mode: one call per op over each
    length-bucketed batch (`ours <mode>`), the same replayed from CUDA graphs (`ours <mode>, CUDA
    graphs`), and each clip alone (`ours <mode>, clip by clip`: what batching buys); the share of
    codes equal to each clip alone. Then `decode_batch` on those codes against decoding clip by clip."""
    import numpy as np

    from encodec_fast.graphs import EncoderGraphs
    from encodec_fast.precision import MODES
    rng = np.random.default_rng(0)
    shortest, longest = RAGGED_SECONDS
    seconds = np.exp(rng.uniform(np.log(shortest), np.log(longest), RAGGED_CLIPS))
    wavs = [voice_batch(net.sample_rate, float(s), net.channels, seed=i)[0].to(ctx.device)
            for i, s in enumerate(seconds)]
    audio_s = float(sum(w.shape[-1] for w in wavs)) / net.sample_rate
    kbps = 6.0
    params = {"model": "24khz", "op": "encode_batch", "batch": RAGGED_CLIPS, "seconds": f"{shortest:g}-{longest:g}",
              "kbps": kbps,
              "device": ctx.device}
    net.set_target_bandwidth(kbps)
    budget = 64 * 10 * net.sample_rate
    sync = torch.cuda.synchronize if ctx.device == "cuda" else (lambda: None)
    for mode in MODES:
        ctx.check_time(f"ragged batch, {mode}")
        net.set_precision(mode)

        def alone():
            return [net.encode(w[None])[0][0] for w in wavs]

        def batched():
            return [f[0][0] for f in net.encode_batch(wavs, max_batch_samples=budget)]

        graphs = EncoderGraphs(net)

        def graphed():
            net._cuda_graphs = graphs
            try:
                return batched()
            finally:
                net._cuda_graphs = None

        with torch.no_grad():
            ctx.timed(params, {f"ours {mode}": batched, f"ours {mode}, CUDA graphs": graphed,
                               f"ours {mode}, clip by clip": alone},
                      sync=sync,
                      audio_seconds=audio_s, weights=source)
            ref = alone()
            for name, got in ((f"ours {mode}", batched()), (f"ours {mode}, CUDA graphs", graphed())):
                equal = sum(int((a == b).sum()) for a, b in zip(ref, got))
                total = sum(a.numel() for a in ref)
                ctx.record(params, name, "codes_equal_clip_alone", "%", [100 * equal / total], higher_is_better=True,
                           graphs_captured=graphs.captures)
            # and back: the same clips' codes decoded together (decode_batch) or one by one
            frames = [[(codes, None)] for codes in ref]
            ctx.timed({**params, "op": "decode_batch"},
                      {f"ours {mode}": lambda: net.decode_batch(frames, max_batch_samples=budget),
                       f"ours {mode}, clip by clip": lambda: [net.decode(f) for f in frames]},
                      sync=sync,
                      audio_seconds=audio_s, weights=source)
    net.set_precision("exact")


def _equal_share(codes: torch.Tensor, ref: torch.Tensor) -> tp.Tuple[float, int]:
    """(share of equal codes over the codebooks and frames both [B, K, frames] tensors have, frames compared)."""
    frames, k = min(codes.shape[-1], ref.shape[-1]), min(codes.shape[1], ref.shape[1])
    return (codes[:, :k, :frames] == ref[:, :k, :frames]).double().mean().item(), frames


def _ours_settings(c: peers.Codec) -> tp.Dict[str, str]:
    """What ours (or the torch path) computed in: precision mode, ops backend, torch's switches for it."""
    from encodec_fast import precision
    from encodec_fast.ops import conv
    kernel = c.conv_kernel or conv.conv_kernel()
    return {"mode": c.mode, "backend": c.backend, "conv_kernel": kernel, **precision.torch_settings(c.mode)}


def _agreement(ctx: Context, live: tp.Dict[str, peers.Codec], encoded: tp.Dict[str, tp.Any],
               params: tp.Dict[str, tp.Any]) -> None:
    """Share of codes equal to upstream's (common frames) and the decoded audio's largest
    difference from upstream's decode of its own codes."""
    if "upstream" not in encoded:
        return
    ref_codes = live["upstream"].codes(encoded["upstream"])
    ref_audio = live["upstream"].decode(encoded["upstream"])
    for name in encoded:
        if name == "upstream":
            continue
        codes = live[name].codes(encoded[name])
        equal, frames = _equal_share(codes, ref_codes)
        ctx.record(params, name, "codes_equal_upstream", "%", [100 * equal], higher_is_better=True,
                   note=f"over {frames} common frames" + ("" if codes.shape == ref_codes.shape else
                                                           f"; shapes {tuple(codes.shape)} vs "
                                                           f"{tuple(ref_codes.shape)}"))
        audio = live[name].decode(encoded[name])
        n = min(audio.shape[-1], ref_audio.shape[-1])
        diff = (audio[..., :n] - ref_audio[..., :n]).abs().max().item()
        ctx.record({**params, "op": "decode"}, name, "audio_max_abs_diff_upstream", "", [diff])


def _settings(records: tp.Dict[str, tp.Any], live: tp.Dict[str, peers.Codec]) -> None:
    """What each side computed in: ours and the torch path by precision mode and backend (with
    torch's switches the mode sets on CUDA); upstream and transformers run as torch is configured."""
    for name, rec in records.items():
        c = live.get(name)
        if c is None or rec.get("na"):
            continue
        if c.impl == "ours" and c.mode is not None:
            rec["settings"] = _ours_settings(c)
        elif c.impl != "ours" and torch.cuda.is_available():
            rec["settings"] = {"mode": "torch's defaults",
                               "cudnn.conv.fp32_precision": getattr(torch.backends.cudnn.conv, "fp32_precision", "?"),
                               "cudnn.rnn.fp32_precision": getattr(torch.backends.cudnn.rnn, "fp32_precision", "?")}


def _agreement_with_cpu(ctx: Context, live: tp.Dict[str, peers.Codec], encoded: tp.Dict[str, tp.Any],
                        cpu: peers.Codec, x: torch.Tensor, kbps: float, params: tp.Dict[str, tp.Any]) -> None:
    """Share of each GPU implementation's codes equal to the CPU fp32 codes (ours on CPU: upstream's
    codes) of the batch's first two clips."""
    rows = min(2, x.shape[0])
    cpu = peers.Codec(cpu.impl, cpu.net, cpu.sample_rate, cpu.channels, "exact", "auto")
    ref = cpu.codes(cpu.encode(x[:rows].cpu(), kbps))
    for name, enc in encoded.items():
        equal, frames = _equal_share(live[name].codes(enc)[:rows].cpu(), ref)
        ctx.record(params, name, "codes_equal_cpu_fp32", "%", [100 * equal], higher_is_better=True,
                   note=f"the first {rows} clip(s), {frames} frames, against ours on CPU in fp32")


def _mode_agreement(ctx: Context) -> None:
    """Each precision mode on trained weights and real audio: the shipped small model's codes for
    held-out speech and music (one clip per call) against its CPU fp32 codes (upstream's), at 6 and
    24 kbps; ours (`ours <mode>`) and, on CUDA, the torch path in the same mode (`torch <mode>`).
    On CPU, tf32 is exact (no TF32 on CPUs) and is left out."""
    from bench.benchmarks.quality import heldout_clips
    state, source = peers.load_state("small", None)
    cpu = peers.build("ours", "small", state, "cpu")
    here = peers.build("ours", "small", state, ctx.device)
    count, seconds = ctx.pick(1, 2, 4), ctx.pick(2.0, 5.0, 8.0)
    clips, missing = heldout_clips(["speech", "music"], count, seconds)
    modes = [m for m in peers.MODES if ctx.device == "cuda" or m != "tf32"]
    backends = ("auto", "torch") if ctx.device == "cuda" else ("auto",)
    for kind in ("speech", "music"):
        for kbps in (6.0, 24.0):
            params = {"model": "small", "op": "encode", "audio": f"held-out {kind}", "batch": count,
                      "seconds": seconds, "kbps": kbps, "device": ctx.device}
            if kind not in clips:
                ctx.na(params, "ours exact", "codes_equal_cpu_fp32", "%", missing[kind])
                continue
            ctx.check_time(f"agreement, {kind} at {kbps:g} kbps")
            ref = [cpu.codes(peers.Codec("ours", cpu.net, 24000, 1, "exact").encode(c[None], kbps))
                   for c in clips[kind]]
            for backend in backends:
                for mode in modes:
                    c = peers.Codec("ours", here.net, 24000, 1, mode, backend)
                    got = [c.codes(c.encode(clip[None].to(ctx.device), kbps)).cpu() for clip in clips[kind]]
                    equal = sum(int((g == r).sum()) for g, r in zip(got, ref)) / sum(r.numel() for r in ref)
                    name = f"{'ours' if backend == 'auto' else 'torch'} {mode}"
                    ctx.record(params, name, "codes_equal_cpu_fp32", "%", [100 * equal], higher_is_better=True,
                               weights=source, settings=_ours_settings(c),
                               note=f"{len(ref)} clip(s), one call each, against the CPU fp32 codes")


def _cuda_memory(ctx: Context, live, x, kbps, params) -> None:
    for name, c in live.items():
        for op in ("encode", "decode"):
            try:
                enc = c.encode(x, kbps) if op == "decode" else None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                c.encode(x, kbps) if op == "encode" else c.decode(enc)
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
                ctx.record({**params, "op": op}, name, "peak_memory", "MB", [peak], memory="cuda max allocated")
            except Exception as err:
                ctx.na({**params, "op": op}, name, "peak_memory", "MB", f"{type(err).__name__}: {err}"[:300])
            finally:
                torch.cuda.empty_cache()


def _cpu_memory(ctx: Context, model: str, state, source: str) -> None:
    path = ctx.workdir / f"codec_state_{model}.pt"
    torch.save(state, path)
    every = cases(ctx.suite, model)
    # the smoke suite checks the memory process on the headline case only (a child process per
    # model and case costs time; the plumbing is the same)
    todo = [HEADLINE[ctx.suite][model]] if ctx.suite == "smoke" else every
    ctx.check_time(f"{model} memory")
    impls, left_out = ctx.in_own_process(peers.IMPLS)
    out, reason = run_child(["-m", "bench.child", "codec", ",".join(impls), model, str(path), json.dumps(todo),
                             "tuned" if _tuned() else "default"], timeout=max(60.0, min(4 * 3600.0,
                                                                                        ctx.time_left() + 60)))
    done = {(r["impl"], r["op"], *r["case"]): r for r in (out or {}).get("cases", [])}
    for impl in peers.IMPLS:
        for op in ("encode", "decode"):
            for case in every:
                params = _params(model, op, *case, "cpu")
                r = done.get((impl, op, *case))
                if case not in todo:
                    ctx.na(params, impl, "peak_memory", "MB",
                           "the smoke suite measures memory on the headline case only")
                elif impl in left_out:
                    ctx.na(params, impl, "peak_memory", "MB", SMOKE_LEFT_OUT)
                elif r is None:
                    why = (out or {}).get("unavailable", {}).get(impl) or (out or {}).get("error") or reason
                    ctx.na(params, impl, "peak_memory", "MB", why or "not run")
                elif "error" in r:
                    ctx.na(params, impl, "peak_memory", "MB", r["error"])
                else:
                    ctx.record(params, impl, "peak_memory", "MB", [r["peak_over_baseline_mb"]],
                               memory=f"CPU: peak RSS during the call minus RSS before it, own process "
                                      f"({out.get('method')})", process_peak_mb=r["peak_rss_mb"], weights=source)


def _tuned() -> bool:
    from encodec_fast import cpu
    return cpu.is_tuned()


def child(impls: str, model: str, state_path: str, todo: str, allocator: str) -> None:
    """The implementations (comma-separated) of one model in a fresh process: for each, encode then
    decode every case; prints JSON after each case. A case's figure is the peak RSS during the call
    (VmHWM, reset just before it) minus the RSS just before it; glibc is set to return freed memory
    at once, so every case starts from the same RSS whatever ran before it (the other models stay
    loaded: a constant). `allocator` is the suite's setting, recorded; the peak a call needs does
    not depend on whether freed memory is kept afterwards."""
    import gc
    exact = release_freed_memory() and reset_peak_rss()
    result: tp.Dict[str, tp.Any] = {"cases": [], "unavailable": {}, "suite_allocator": allocator,
                                    "method": "VmHWM reset per call" if exact else
                                    "process peak so far (ru_maxrss): cases in increasing size"}
    state = torch.load(state_path)
    cases_ = json.loads(todo)
    for impl in impls.split(","):
        try:
            codec = peers.build(impl, model, state)
        except peers.Unavailable as err:
            result["unavailable"][impl] = str(err)
            continue
        # one tiny call first: one-time costs (thread pools, lazy imports, first use) are not a case's
        warm = voice_batch(codec.sample_rate, 0.1, codec.channels)
        codec.decode(codec.encode(warm, cases_[0][2]))
        for op, (batch, seconds, kbps) in [(op, case) for op in ("encode", "decode") for case in cases_]:
            entry: tp.Dict[str, tp.Any] = {"impl": impl, "op": op, "case": [batch, seconds, kbps]}
            try:
                if op == "encode":
                    args = (voice_batch(codec.sample_rate, seconds, codec.channels, batch=batch), kbps)
                    fn = codec.encode
                else:
                    args = (codec.random_codes(batch, seconds, kbps),)
                    fn = codec.decode
                gc.collect()
                before = rss_mb()
                if exact:
                    reset_peak_rss()
                out = fn(*args)
                peak = hwm_mb()
                del out, args
                entry.update(peak_rss_mb=peak, peak_over_baseline_mb=peak - before)
            except Exception as err:  # out of memory, or the peer cannot: recorded per case
                entry["error"] = f"{type(err).__name__}: {err}"[:300]
            result["cases"].append(entry)
            print(json.dumps(result), flush=True)
        del codec
        gc.collect()
