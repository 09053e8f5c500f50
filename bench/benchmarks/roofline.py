"""How close encoding and decoding come to this machine's measured matrix-multiply peak.

GFLOP per audio second are counted from the model: convolutions with torch's FlopCounterMode (on
the actual calls), the LSTMs from their shapes (2 x 4 gates x hidden x (input + hidden) per frame
and layer), the codebook search as 2 x frames x bins x dimension per stage. The peak is the median
rate of fp32 `torch.mm` at n = 2048 on this process's threads. A fraction well under 1 says how
much of the time goes elsewhere than arithmetic (memory traffic, padding, normalisation, the
LSTM's sequential steps, Python).
"""

import math
import time
import typing as tp

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import peers
from bench.core import Context, benchmark
from encodec_fast.testing import voice_batch


def matmul_gflops(n: int, reps: int, device: str) -> tp.List[float]:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    out = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return out


def _lstm_flops(module: torch.nn.Module, frames: int) -> float:
    total = 0.0
    for m in module.modules():
        if isinstance(m, torch.nn.LSTM):
            for layer in range(m.num_layers):
                inp = m.input_size if layer == 0 else m.hidden_size
                total += 2 * 4 * m.hidden_size * (inp + m.hidden_size) * frames
    return total


def count_gflops(codec: peers.Codec, seconds: float, kbps: float) -> tp.Dict[str, float]:
    """GFLOP of encoding and decoding `seconds` of one channel group at `kbps`."""
    net = codec.net
    x = voice_batch(codec.sample_rate, seconds, codec.channels)
    frames = math.ceil(x.shape[-1] / 320)
    net.set_target_bandwidth(kbps)
    stages = net.quantizer.get_num_quantizers_for_bandwidth(net.frame_rate, kbps)
    dim, bins = net.quantizer.dimension, net.quantizer.bins
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            z = net.encoder(x)
        encoder = counter.get_total_flops() + _lstm_flops(net.encoder, frames)
        counter = FlopCounterMode(display=False)
        with counter:
            net.decoder(z)
        decoder = counter.get_total_flops() + _lstm_flops(net.decoder, frames)
    search = 2 * frames * bins * dim * stages
    return {"encode": (encoder + search) / 1e9, "decode": (decoder + frames * dim * stages) / 1e9}


@benchmark("roofline", "Encoder / decoder GFLOP per audio second and the fraction of the measured matmul peak",
           priority=65)
def run(ctx: Context) -> None:
    device = ctx.device
    n = ctx.pick(256, 2048, 2048)
    peak = matmul_gflops(n, ctx.pick(3, 10, 20), device)
    peak_rec = ctx.record({"n": n, "device": device}, "torch.mm fp32", "matmul_peak", "GFLOP/s", peak,
                          higher_is_better=True)
    model, kbps = "24khz", 6.0
    batch, seconds = ctx.pick((1, 0.5), (8, 1.0), (8, 5.0))
    state, source = peers.load_state(model, None)
    codecs = {k: v for k, v in peers.build_all(model, state, ("ours", "upstream"), device).items()
              if isinstance(v, peers.Codec)}
    flops = count_gflops(peers.build("ours", model, state), seconds, kbps)
    params = {"model": model, "batch": batch, "seconds": seconds, "kbps": kbps, "device": device}
    for op in ("encode", "decode"):
        ctx.record({**params, "op": op}, "model", "gflop_per_audio_second", "GFLOP", [flops[op] / seconds],
                   note="convolutions counted by FlopCounterMode, LSTM and codebook search from their shapes")
    x = voice_batch(24000, seconds, 1, batch=batch).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    enc = ctx.timed({**params, "op": "encode"}, {k: (lambda c=c: c.encode(x, kbps)) for k, c in codecs.items()},
                    metric="time", unit="s", sync=sync, audio_seconds=batch * seconds)
    frames = {k: c.encode(x, kbps) for k, c in codecs.items()}
    dec = ctx.timed({**params, "op": "decode"}, {k: (lambda c=codecs[k], f=f: c.decode(f)) for k, f in frames.items()},
                    metric="time", unit="s", sync=sync, audio_seconds=batch * seconds)
    for op, recs in (("encode", enc), ("decode", dec)):
        work = flops[op] * batch
        for impl, rec in recs.items():
            if rec.get("na"):
                continue
            rates = [work / t for t in rec["reps"]]
            ctx.record({**params, "op": op}, impl, "fraction_of_matmul_peak", "",
                       [r / peak_rec["median"] for r in rates],
                       higher_is_better=True, achieved_gflops=sorted(rates)[len(rates) // 2], weights=source)
