"""`streaming`: latency and real-time factor of the streaming encoder and decoder (24 kHz models), on
one thread, and the low-latency mode's agreement with the whole-file codes.

Audio is pushed in chunks of 10-320 ms as if it arrived in real time:
- algorithmic latency: for every frame, the audio time between its last sample and the end of the
  chunk whose push returned its codes (compute not counted), the maximum over frames (the first 7
  frames, which the start-up holds, are reported apart);
- compute per push and the real-time factor (compute time over audio time; < 1 keeps up);
- the low-latency mode's (`exact=False`) codes against the whole-file codes: fraction equal over
  all codebooks and on the first; the exact mode's (must be 1.0).
The decoder gets the codes in pieces of the same duration (at least one 13.3 ms frame).

Weights: the 24 kHz model with random weights and data-like codebooks (the compute), and the
shipped small model's trained weights on held-out espeak-ng speech and synthesized music (the
agreement: trained codebooks have near-ties where real audio goes).
"""

import statistics
import time
import typing as tp

import torch

from bench.core import Context, benchmark

STARTUP_FRAMES = 7  # frames the start-up holds (reflect padding of the last convolution)


def encoder_run(model, x, chunk: int, exact: bool):
    """Push x [C, n] in chunks -> (codes [K, T], seconds per push, (frame, delay in samples) pairs)."""
    from encodec_fast.streaming import StreamingEncoder
    enc = StreamingEncoder(model, exact=exact)
    times, codes, delays = [], [], []
    hop = model.hop_length
    frames_out = 0
    n = x.shape[-1]
    sync = _sync(x)
    for a in range(0, n, chunk):
        piece = x[:, a:a + chunk]
        t0 = time.perf_counter()
        out = enc.push(piece)
        sync()
        times.append(time.perf_counter() - t0)
        end = a + piece.shape[-1]  # the audio time of this push
        for f in range(frames_out, frames_out + out.shape[-1]):
            delays.append((f, end - min(n, (f + 1) * hop)))
        frames_out += out.shape[-1]
        codes.append(out)
    t0 = time.perf_counter()
    tail = enc.flush()
    sync()
    times.append(time.perf_counter() - t0)
    for f in range(frames_out, frames_out + tail.shape[-1]):  # flushed at the end of the audio
        delays.append((f, n - min(n, (f + 1) * hop)))
    codes.append(tail)
    return torch.cat(codes, dim=-1), times, delays


def decoder_run(model, codes, frames_per_push: int) -> tp.List[float]:
    """Push codes [K, T] in pieces -> seconds per push (flush included)."""
    from encodec_fast.streaming import StreamingDecoder
    dec = StreamingDecoder(model)
    sync = _sync(codes)
    times = []
    for a in range(0, codes.shape[-1], frames_per_push):
        t0 = time.perf_counter()
        dec.push(codes[:, a:a + frames_per_push])
        sync()
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    dec.flush()
    sync()
    times.append(time.perf_counter() - t0)
    return times


def _sync(t):
    return torch.cuda.synchronize if t.device.type == "cuda" else (lambda: None)


def p95(values: tp.Sequence[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.95 * len(values)))]


def measure(model, x, chunks_ms: tp.Sequence[float], modes: tp.Sequence[str] = ("low-latency", "exact"),
            decoder: bool = True, log: tp.Callable[[tp.Dict[str, tp.Any]], None] = lambda row: None
            ) -> tp.List[tp.Dict[str, tp.Any]]:
    """Rows for the streaming encoder (each mode) and decoder of `model` (at its current
    bandwidth) on x [C, n], per chunk size; each row keeps every push's compute time (`times_s`)."""
    sr, hop = model.sample_rate, model.hop_length
    with torch.no_grad():
        (whole, _), = model.encode(x[None])
    whole = whole[0]
    audio_s = x.shape[-1] / sr
    rows = []
    for ms in chunks_ms:
        chunk = max(1, int(round(ms * sr / 1000)))
        for mode in modes:
            codes, times, delays = encoder_run(model, x, chunk, exact=mode == "exact")
            steady = [d for f, d in delays if f >= STARTUP_FRAMES]
            same = codes.shape == whole.shape
            rows.append({"part": "encoder", "mode": mode, "chunk_ms": ms, "pushes": len(times),
                         "latency_ms": 1000 * max(steady) / sr if steady else None,
                         "startup_ms": 1000 * max((d + (f + 1) * hop for f, d in delays if f < STARTUP_FRAMES),
                                                  default=0) / sr,
                         "compute_ms_median": 1000 * statistics.median(times), "compute_ms_p95": 1000 * p95(times),
                         "rtf": sum(times) / audio_s, "times_s": times, "audio_seconds": audio_s,
                         "codes_equal": (codes == whole).float().mean().item() if same else float("nan"),
                         "codes_equal_first_codebook": (codes[0] == whole[0]).float().mean().item()
                         if same else float("nan")})
            log(rows[-1])
        if decoder:
            frames = max(1, int(round(ms * sr / 1000 / hop)))
            times = decoder_run(model, whole, frames)
            rows.append({"part": "decoder", "mode": "streaming", "chunk_ms": 1000 * frames * hop / sr,
                         "pushes": len(times), "latency_ms": 0.0, "startup_ms": 1000 * STARTUP_FRAMES * hop / sr,
                         "compute_ms_median": 1000 * statistics.median(times), "compute_ms_p95": 1000 * p95(times),
                         "rtf": sum(times) / audio_s, "times_s": times, "audio_seconds": audio_s})
            log(rows[-1])
    return rows


def load_model(name: str, device: str = "cpu"):
    """(model, description of its weights): `24khz` random with data-like codebooks, `small` the
    shipped trained weights."""
    from bench.peers import ours_model, random_state
    if name == "small":
        from encodec_fast import EncodecModel
        state, weights = EncodecModel.encodec_model_24khz_small().state_dict(), "the shipped small model (trained)"
    else:
        state, weights = random_state(name, seed=0), "random (data-like codebooks)"
    return ours_model(name, state).to(device), weights


def load_audio(kind: str, sample_rate: int, seconds: float, device: str = "cpu"):
    """Mono audio [1, n] of `kind`: tones, or held-out speech / music clips joined (None and the
    reason when it cannot be made here)."""
    from encodec_fast.testing import voice_batch
    if kind == "tones":
        return voice_batch(sample_rate, seconds, 1, batch=1, seed=5)[0].to(device), None
    from bench.benchmarks.quality import heldout_clips
    clips, missing = heldout_clips([kind], count=max(1, int(seconds // 4) + 1), seconds=12.0)
    if kind in missing:
        return None, missing[kind]
    x = torch.cat(clips[kind], dim=-1)[:, :int(seconds * sample_rate)]
    return x.to(device), None


@benchmark("streaming", "Streaming encoder / decoder: latency, compute per push, real-time factor (1 thread), "
           "low-latency code agreement", priority=45)
def streaming(ctx: Context) -> None:
    chunks = ctx.pick([20, 320], [10, 20, 40, 80, 320], [10, 20, 40, 80, 320])
    seconds = ctx.pick(1.0, 10.0, 30.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for model_name, kinds in (("24khz", ("tones",)), ("small", ("speech", "music"))):
            model, weights = load_model(model_name, ctx.device)
            model.set_target_bandwidth(6.0)
            for kind in kinds:
                base = {"model": model_name, "audio": kind, "kbps": 6.0, "device": ctx.device, "threads": 1}
                ctx.check_time(f"{model_name} on {kind}")
                x, missing = load_audio(kind, model.sample_rate, seconds, ctx.device)
                if x is None:
                    ctx.na({**base, "part": "encoder"}, "ours", "codes_equal_whole_file", "%", missing)
                    continue
                for r in measure(model, x, chunks):
                    params = {**base, "part": r["part"], "mode": r["mode"], "chunk_ms": round(r["chunk_ms"], 2)}
                    extra = dict(weights=weights, audio_seconds=r["audio_seconds"], pushes=r["pushes"])
                    ctx.record(params, "ours", "compute_per_push", "ms", [1000 * t for t in r["times_s"]], **extra)
                    ctx.record(params, "ours", "real_time_factor", "", [r["rtf"]],
                               note="compute time over audio time (< 1 keeps up)", **extra)
                    if r["latency_ms"] is not None:
                        ctx.record(params, "ours", "latency", "ms", [r["latency_ms"]], startup_ms=r["startup_ms"],
                                   note="algorithmic: a frame's last sample to the push that returns its codes, "
                                        f"after the first {STARTUP_FRAMES} frames", **extra)
                    if "codes_equal" in r:
                        ctx.record(params, "ours", "codes_equal_whole_file", "%", [100 * r["codes_equal"]],
                                   higher_is_better=True, first_codebook=100 * r["codes_equal_first_codebook"],
                                   **extra)
    finally:
        torch.set_num_threads(threads)
