"""Latency and real-time factor of the streaming encoder and decoder (24 kHz model), one CPU thread.

    python bench/streaming_latency.py [--seconds 20] [--chunks-ms 10 20 40 80 320] [--checkpoint PATH]
                                      [--threads 1] [--out DIR]

Audio (`peers.signal` tones, or the shipped small model's held-out speech is not needed: the
numbers are about compute) is pushed in chunks of each size as if it arrived in real time:
- algorithmic latency: for every frame, the audio time between its last sample and the end of
  the chunk whose push returned its codes (compute not counted), the maximum over frames
  (the first 7 frames, which the start-up holds, are reported apart);
- compute per push (median and 95th percentile) and the real-time factor (compute time over
  audio time; < 1 keeps up);
- the low-latency mode's (`exact=False`) codes against the whole-file codes: fraction equal
  over all codebooks and on the first; the exact mode's (must be 1.0).
The decoder gets the codes in pieces of the same duration (at least one 13.3 ms frame).
Random weights with data-like codebooks unless --checkpoint; prints a table, writes
DIR/streaming_latency.{json,md} with --out.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def encoder_run(model, x, chunk: int, exact: bool):
    import torch

    from encodec_fast.streaming import StreamingEncoder
    enc = StreamingEncoder(model, exact=exact)
    times, codes, delays = [], [], []
    hop = model.hop_length
    frames_out = 0
    n = x.shape[-1]
    for a in range(0, n, chunk):
        piece = x[:, a:a + chunk]
        t0 = time.perf_counter()
        out = enc.push(piece)
        times.append(time.perf_counter() - t0)
        end = a + piece.shape[-1]  # the audio time of this push
        for f in range(frames_out, frames_out + out.shape[-1]):
            delays.append((f, end - min(n, (f + 1) * hop)))
        frames_out += out.shape[-1]
        codes.append(out)
    t0 = time.perf_counter()
    tail = enc.flush()
    times.append(time.perf_counter() - t0)
    for f in range(frames_out, frames_out + tail.shape[-1]):  # flushed at the end of the audio
        delays.append((f, n - min(n, (f + 1) * hop)))
    codes.append(tail)
    return torch.cat(codes, dim=-1), times, delays


def decoder_run(model, codes, frames_per_push: int):
    from encodec_fast.streaming import StreamingDecoder
    dec = StreamingDecoder(model)
    times = []
    for a in range(0, codes.shape[-1], frames_per_push):
        t0 = time.perf_counter()
        dec.push(codes[:, a:a + frames_per_push])
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    dec.flush()
    times.append(time.perf_counter() - t0)
    return times


def p95(values):
    values = sorted(values)
    return values[min(len(values) - 1, int(0.95 * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--chunks-ms", type=float, nargs="+", default=[10, 20, 40, 80, 320])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bandwidth", type=float, default=6.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    from bench.peers import ours_model, random_state, signal
    torch.set_num_threads(args.threads)
    state = torch.load(args.checkpoint, map_location="cpu") if args.checkpoint else random_state("24khz", seed=0)
    model = ours_model("24khz", state)
    model.set_target_bandwidth(args.bandwidth)
    sr, hop = model.sample_rate, model.hop_length
    x = signal(sr, args.seconds, 1, batch=1, seed=5)[0]
    with torch.no_grad():
        (whole, _), = model.encode(x[None])
    whole = whole[0]
    audio_s = x.shape[-1] / sr
    rows = []
    for ms in args.chunks_ms:
        chunk = max(1, int(round(ms * sr / 1000)))
        for mode, exact in (("low-latency", False), ("exact", True)):
            codes, times, delays = encoder_run(model, x, chunk, exact)
            steady = [d for f, d in delays if f >= 7]
            agree = (codes == whole).float().mean().item() if codes.shape == whole.shape else float("nan")
            rows.append({"part": "encoder", "mode": mode, "chunk_ms": ms, "pushes": len(times),
                         "latency_ms": 1000 * max(steady) / sr if steady else None,
                         "startup_ms": 1000 * max((d + (f + 1) * hop for f, d in delays if f < 7), default=0) / sr,
                         "compute_ms_median": 1000 * statistics.median(times), "compute_ms_p95": 1000 * p95(times),
                         "rtf": sum(times) / audio_s, "codes_equal": agree,
                         "codes_equal_first_codebook": (codes[0] == whole[0]).float().mean().item()
                         if codes.shape == whole.shape else float("nan")})
            print(json.dumps(rows[-1]), flush=True)
        frames = max(1, int(round(ms * sr / 1000 / hop)))
        times = decoder_run(model, whole, frames)
        rows.append({"part": "decoder", "mode": "streaming", "chunk_ms": 1000 * frames * hop / sr,
                     "pushes": len(times), "latency_ms": 0.0, "startup_ms": 1000 * 7 * hop / sr,
                     "compute_ms_median": 1000 * statistics.median(times), "compute_ms_p95": 1000 * p95(times),
                     "rtf": sum(times) / audio_s})
        print(json.dumps(rows[-1]), flush=True)
    context = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "threads": args.threads,
               "torch": torch.__version__, "weights": str(args.checkpoint or "random (data-like codebooks)"),
               "audio_seconds": audio_s, "command": "python bench/streaming_latency.py " + " ".join(sys.argv[1:])}

    def fmt(v, spec=".1f"):
        return "—" if v is None else format(v, spec)
    table = ["| part | mode | chunk (ms) | latency after start-up (ms) | start-up (ms) | compute per push, median / p95 (ms) "
             "| real-time factor | codes equal to whole-file (all / first codebook) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eq = (f"{100 * r['codes_equal']:.2f}% / {100 * r['codes_equal_first_codebook']:.2f}%"
              if "codes_equal" in r else "—")
        table.append(f"| {r['part']} | {r['mode']} | {r['chunk_ms']:g} | {fmt(r['latency_ms'])} | {fmt(r['startup_ms'])} "
                     f"| {r['compute_ms_median']:.2f} / {r['compute_ms_p95']:.2f} | {r['rtf']:.3f} | {eq} |")
    print("\n".join(table))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "streaming_latency.json").write_text(json.dumps({"context": context, "rows": rows}, indent=1))
        (args.out / "streaming_latency.md").write_text(
            f"# Streaming latency and real-time factor ({context['date']})\n\n`{context['command']}`; "
            f"{context['machine']}, {context['cpu_count']} CPUs, {args.threads} torch thread(s), torch "
            f"{context['torch']}, 24 kHz model, {context['weights']} weights, {args.bandwidth:g} kbps, "
            f"{audio_s:g} s of audio.\n\nLatency: audio time from a frame's last sample to the end of the chunk "
            "whose push returned its codes, the largest over frames after the first 7 (compute not counted); "
            "start-up: when the first 7 frames came out. Real-time factor: compute over audio time.\n\n"
            + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
