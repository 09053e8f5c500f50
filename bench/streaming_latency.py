"""Latency and real-time factor of the streaming encoder and decoder (24 kHz models), one thread.

    python -m bench.streaming_latency [--seconds 20] [--chunks-ms 10 20 40 80 320]
                                      [--model 24khz|small] [--checkpoint PATH] [--audio tones|speech|music]
                                      [--threads 1] [--device cpu|cuda] [--out DIR]

Audio is pushed in chunks of each size as if it arrived in real time:
- algorithmic latency: for every frame, the audio time between its last sample and the end of
  the chunk whose push returned its codes (compute not counted), the maximum over frames
  (the first 7 frames, which the start-up holds, are reported apart);
- compute per push (median and 95th percentile) and the real-time factor (compute time over
  audio time; < 1 keeps up);
- the low-latency mode's (`exact=False`) codes against the whole-file codes: fraction equal
  over all codebooks and on the first; the exact mode's (must be 1.0).
The decoder gets the codes in pieces of the same duration (at least one 13.3 ms frame).

Weights: `--model 24khz` has random weights with data-like codebooks (compute is what matters),
`--model small` the shipped small model's trained weights (what the agreement of the
low-latency mode is about: trained codebooks have near-ties where real audio goes); `--checkpoint`
loads a state dict into the model's architecture. Audio: `tones` (`peers.signal`), or held-out
`speech` (espeak-ng) / `music` clips as in the quality benchmark. The suite (`python -m bench`,
benchmark `streaming`) runs the same `measure` on both models.
"""

import argparse
import statistics
import sys
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STARTUP_FRAMES = 7  # frames the start-up holds (reflect padding of the last convolution)


def encoder_run(model, x, chunk: int, exact: bool):
    """Push x [C, n] in chunks -> (codes [K, T], seconds per push, (frame, delay in samples) pairs)."""
    import torch

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
    import torch
    return torch.cuda.synchronize if t.device.type == "cuda" else (lambda: None)


def p95(values: tp.Sequence[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.95 * len(values)))]


def measure(model, x, chunks_ms: tp.Sequence[float], modes: tp.Sequence[str] = ("low-latency", "exact"),
            decoder: bool = True, log: tp.Callable[[tp.Dict[str, tp.Any]], None] = lambda row: None
            ) -> tp.List[tp.Dict[str, tp.Any]]:
    """Rows for the streaming encoder (each mode) and decoder of `model` (at its current
    bandwidth) on x [C, n], per chunk size; each row keeps every push's compute time (`times_s`)."""
    import torch
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


def table(rows: tp.Sequence[tp.Dict[str, tp.Any]]) -> str:
    def fmt(v, spec=".1f"):
        return "—" if v is None else format(v, spec)
    lines = ["| part | mode | chunk (ms) | latency after start-up (ms) | start-up (ms) | compute per push, median / "
             "p95 (ms) | real-time factor | codes equal to whole-file (all / first codebook) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eq = (f"{100 * r['codes_equal']:.2f}% / {100 * r['codes_equal_first_codebook']:.2f}%"
              if "codes_equal" in r else "—")
        lines.append(f"| {r['part']} | {r['mode']} | {r['chunk_ms']:g} | {fmt(r['latency_ms'])} "
                     f"| {fmt(r['startup_ms'])} "
                     f"| {r['compute_ms_median']:.2f} / {r['compute_ms_p95']:.2f} | {r['rtf']:.3f} | {eq} |")
    return "\n".join(lines)


def load_model(name: str, checkpoint: tp.Optional[Path], device: str = "cpu"):
    """(model, description of its weights): `24khz` random with data-like codebooks, `small` the
    shipped trained weights; `checkpoint` loads into that architecture."""
    import torch

    from bench.peers import ours_model, random_state
    if checkpoint is not None:
        state, weights = torch.load(checkpoint, map_location="cpu"), str(checkpoint)
    elif name == "small":
        from encodec_fast import EncodecModel
        state, weights = EncodecModel.encodec_model_24khz_small().state_dict(), "the shipped small model (trained)"
    else:
        state, weights = random_state(name, seed=0), "random (data-like codebooks)"
    return ours_model(name, state).to(device), weights


def load_audio(kind: str, sample_rate: int, seconds: float, device: str = "cpu"):
    """Mono audio [1, n] of `kind`: tones, or held-out speech / music clips joined (None and the
    reason when it cannot be made here)."""
    import torch

    from bench.peers import signal
    if kind == "tones":
        return signal(sample_rate, seconds, 1, batch=1, seed=5)[0].to(device), None
    from bench.benchmarks.quality import heldout_clips
    clips, missing = heldout_clips([kind], count=max(1, int(seconds // 4) + 1), seconds=12.0)
    if kind in missing:
        return None, missing[kind]
    x = torch.cat(clips[kind], dim=-1)[:, :int(seconds * sample_rate)]
    return x.to(device), None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--chunks-ms", type=float, nargs="+", default=[10, 20, 40, 80, 320])
    parser.add_argument("--model", choices=["24khz", "small"], default="24khz")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--audio", choices=["tones", "speech", "music"], default="tones")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bandwidth", type=float, default=6.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import json

    import torch

    from bench import report
    torch.set_num_threads(args.threads)
    model, weights = load_model(args.model, args.checkpoint, args.device)
    model.set_target_bandwidth(args.bandwidth)
    x, missing = load_audio(args.audio, model.sample_rate, args.seconds, args.device)
    if x is None:
        raise SystemExit(f"cannot make {args.audio} audio here: {missing}")
    rows = measure(model, x, args.chunks_ms, log=lambda r: print(json.dumps({k: v for k, v in r.items()
                                                                              if k != "times_s"}), flush=True))
    audio_s = x.shape[-1] / model.sample_rate
    head = (f"Streaming latency and real-time factor\n\n`python -m bench.streaming_latency {' '.join(sys.argv[1:])}`; "
            f"{args.threads} torch thread(s) on {args.device}, {args.model} model, {weights} weights, "
            f"{args.bandwidth:g} kbps, {audio_s:g} s of {args.audio} audio.\n\nLatency: audio time from a frame's "
            f"last sample to the end of the chunk whose push returned its codes, the largest over frames after "
            f"the first {STARTUP_FRAMES} (compute not counted); start-up: when the first {STARTUP_FRAMES} frames "
            "came out. Real-time factor: compute over audio time.\n\n")
    report.publish(head + table(rows), args.out, f"streaming_latency_{args.model}_{args.audio}", args,
                   [{k: v for k, v in r.items() if k != "times_s"} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
