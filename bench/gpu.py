"""GPU check and benchmark: every Triton kernel against its PyTorch path, on one CUDA device.

    python -m bench.gpu [--quick] [--configs default|legacy|autotune] [--stages NAME,...]
                        [--budget-seconds S] [--out bench/results]
    python -m bench.gpu --smoke      # no GPU: tiny shapes on CPU in Triton's interpreter (plumbing only)

--configs picks the kernels' launch configurations: `default` (the no-spill table in the kernel
wrappers), `legacy` (the block sizes, warps and stages before the compile check, issue 13: RVQ
64 x 64 blocks with 4 warps, convolutions with 4 warps and 3 pipeline stages; the Conv2d kernel's
loop over kernel width stays a loop), or `autotune` (ENCODEC_FAST_AUTOTUNE=1: triton.autotune over
the listed configurations; the picks are recorded). Each timed Triton op records the launches it
made: kernel, block sizes, num_warps, num_stages, and the compiled kernel's registers, local
memory (spills and stack, as the driver reports it) and shared memory.

1. Correctness on the GPU (the interpreter cannot see everything: TF32, real atomics, bf16):
   RVQ encode codes against the exact-fp32 torch path (differences must be ties), decode
   bit-exact, one training stage (codes, counts, sums), a quantizer training step against the
   torch backend, and the 24 kHz model end to end.
2. Timings with `triton.testing.do_bench` (median ms), each kernel beside its PyTorch path:
   - RVQ encode and decode at batch 64 x 10 s of 24 kHz audio (48,000 frames, D=128, K=1024),
     6 kbps (8 stages) and 24 kbps (32 stages); precisions ieee (exact fp32), tf32x3, tf32, with
     their code agreement against exact fp32; FLOPs, bytes and the fraction of the roofline;
   - the MS-STFT discriminator: spectrogram front end, each Conv2d + LeakyReLU layer (fused
     kernel vs cuDNN, forward and forward + backward, fp32 and bf16), the whole discriminator;
   - a quantizer training step (forward + backward, EMA update) at batch 64 x 1 s, ours with
     each backend and upstream `encodec.quantization.core_vq` when `encodec` is importable;
   - whole-model 24 kHz encode and decode, seconds of audio per second: torch fp32, Triton fp32,
     and bf16 autocast with its code agreement.
3. JSON and a markdown table in `--out` (device, versions, date), rewritten after every stage, so
   a run stopped by a time limit keeps what it finished; --budget-seconds skips the stages that
   would start after that many seconds.

On a machine without network, install `encodec` (optional) from carried wheels first. Nothing
here asserts a speed: a kernel that loses is reported as losing.
"""

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import typing as tp
from pathlib import Path

import torch

from encodec_fast import EncodecModel, ops
from encodec_fast.ops import rvq
from encodec_fast.quantization import ResidualVectorQuantizer

ROOT = Path(__file__).resolve().parent.parent


# Dense peaks (TFLOP/s) and memory bandwidth (TB/s) from NVIDIA's data sheets, by device name.
PEAKS = {
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "hbm_tbs": 2.0},
    "H100": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "hbm_tbs": 3.35},
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "hbm_tbs": 4.8},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "hbm_tbs": 2.0},
}


def peaks_for(name: str) -> tp.Optional[dict]:
    for key in sorted(PEAKS, key=len, reverse=True):
        if key in name:
            return PEAKS[key]
    return None


#: Sizes: the realistic ones, or tiny ones for --smoke (CPU, Triton interpreter, no timing value).
SIZES = {"rvq": (64, 750), "train": (64, 75), "model": (64, 10.0), "big_checks": True}
SMOKE_SIZES = {"rvq": (2, 40), "train": (2, 20), "model": (1, 0.05), "big_checks": False}
SMOKE = False


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_ms(fn: tp.Callable[[], tp.Any], quick: bool) -> float:
    if SMOKE:  # do_bench needs a GPU driver; one call, no warm-up (the interpreter is slow)
        return 1e3 * timed_seconds(fn, 1)
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median"))


def timed_seconds(fn: tp.Callable[[], tp.Any], reps: int) -> float:
    if not SMOKE:  # warm-up (compilation, autotuning); the smoke run's timings mean nothing anyway
        fn()
        sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_books(Q: int, K: int, D: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.85 ** q for q in range(Q)]).view(Q, 1, 1)
    return (torch.randn(Q, K, D, generator=g) * scales).to(device)


def make_latents(books: torch.Tensor, B: int, T: int, seed: int) -> torch.Tensor:
    Q, K, D = books.shape
    g = torch.Generator(device=books.device).manual_seed(seed)
    idx = torch.randint(0, K, (Q, B * T), generator=g, device=books.device)
    x = sum(books[q][idx[q]] for q in range(Q))
    x = x + 0.5 * float(books[-1].std()) * torch.randn(B * T, D, generator=g, device=books.device)
    return x.view(B, T, D).transpose(1, 2).contiguous()


class Precision:
    """Set $ENCODEC_FAST_RVQ_PRECISION inside a block."""

    def __init__(self, value: str):
        self.value, self.old = value, None

    def __enter__(self):
        self.old = os.environ.get("ENCODEC_FAST_RVQ_PRECISION")
        os.environ["ENCODEC_FAST_RVQ_PRECISION"] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("ENCODEC_FAST_RVQ_PRECISION", None)
        else:
            os.environ["ENCODEC_FAST_RVQ_PRECISION"] = self.old


class LaunchLog:
    """Records the Triton launches made inside `record()`: kernel, constexpr block sizes, warps,
    stages and the compiled kernel's resources (from the driver: registers per thread, local memory
    per thread, which holds spills and stack, and shared memory per block)."""

    active: tp.Optional[list] = None
    installed = False

    @classmethod
    def install(cls) -> None:
        if cls.installed or SMOKE:  # the interpreter's kernels have no compiled resources
            return
        from triton.runtime.jit import JITFunction
        original = JITFunction.run

        def run(self, *args, grid, warmup, **kwargs):
            kernel = original(self, *args, grid=grid, warmup=warmup, **kwargs)
            if cls.active is not None and not warmup and kernel is not None:
                try:
                    entry = {"kernel": getattr(self, "__name__", None) or self.fn.__name__}
                    entry.update({k: v for k, v in kwargs.items() if k.startswith("BLOCK_")})
                    entry.update(num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages,
                                 registers=int(kernel.n_regs), local_bytes=4 * int(kernel.n_spills),
                                 shared_bytes=int(kernel.metadata.shared))
                except Exception as exc:  # never let the record break a benchmark
                    entry["error"] = repr(exc)
                if entry not in cls.active:
                    cls.active.append(entry)
            return kernel
        JITFunction.run = run
        cls.installed = True

    @classmethod
    def of(cls, fn: tp.Callable[[], tp.Any]) -> list:
        """The distinct launches one call of fn makes."""
        cls.active = []
        try:
            fn()
            sync()
            return cls.active
        finally:
            cls.active = None


def timed_launches(fn: tp.Callable[[], tp.Any], reps: int) -> tp.Tuple[float, list]:
    """(timed_seconds(fn, reps), LaunchLog.of(fn)); the smoke run times one call under the capture
    (in the interpreter every call counts)."""
    if SMOKE:
        t0 = time.perf_counter()
        launches = LaunchLog.of(fn)
        return time.perf_counter() - t0, launches
    return timed_seconds(fn, reps), LaunchLog.of(fn)


def bench_ms_launches(fn: tp.Callable[[], tp.Any], quick: bool) -> tp.Tuple[float, list]:
    """(bench_ms(fn, quick), LaunchLog.of(fn)), one call for both in the smoke run."""
    if SMOKE:
        seconds, launches = timed_launches(fn, 1)
        return 1e3 * seconds, launches
    return bench_ms(fn, quick), LaunchLog.of(fn)


def launch_text(launches: list) -> str:
    """'kernel CO64 CI32 T128 w8 s1: 128 regs, 0 B local' for each launch (markdown cell)."""
    parts = []
    for e in launches:
        blocks = " ".join(f"{k[6:]}{v}" for k, v in e.items() if k.startswith("BLOCK_"))
        res = (f"{e['registers']} regs, {e['local_bytes']} B local" if "registers" in e else e.get("error", ""))
        parts.append(f"{e['kernel'].strip('_').replace('_kernel', '')} {blocks} w{e.get('num_warps')} "
                     f"s{e.get('num_stages')}: {res}")
    return "<br>".join(parts) if parts else "-"


# -- 1. correctness --------------------------------------------------------------------------------

def check(name: str, results: list, fn: tp.Callable[[], tp.Optional[str]]) -> None:
    t0 = time.perf_counter()
    try:
        detail = fn() or ""
        results.append({"check": name, "ok": True, "detail": detail})
    except Exception as exc:  # report every failure, keep going
        results.append({"check": name, "ok": False, "detail": f"{type(exc).__name__}: {exc}"})
        traceback.print_exc()
    results[-1]["seconds"] = round(time.perf_counter() - t0, 3)
    print(("PASS " if results[-1]["ok"] else "FAIL ") + name, results[-1]["detail"], flush=True)


def correctness(device: str) -> list:
    out: list = []

    def encode_case(B, D, T, K, Q):
        def run():
            books = make_books(Q, K, D, seed=B + D + T + K + Q, device=device)
            x = make_latents(books, B, T, seed=T)
            norms = [b.pow(2).sum(-1)[None] for b in books]
            with ops.use_backend("torch"):
                ref = rvq.rvq_encode(x, list(books), norms)
            with ops.use_backend("triton"):
                got = rvq.rvq_encode(x, list(books), norms)
                strided = rvq.rvq_encode(x.transpose(1, 2).contiguous().transpose(1, 2), list(books), norms)
            agreement = rvq.code_agreement(x, books, ref, got)
            if agreement.non_ties or not torch.equal(got, strided):
                raise AssertionError(str(agreement))
            return f"{agreement.equal}/{agreement.rows} equal, {agreement.ties} ties"
        return run

    shapes = [(1, 128, 1, 1024, 3), (3, 8, 37, 16, 4), (1, 130, 50, 100, 2), (2, 256, 20, 4096, 1)]
    if SIZES["big_checks"]:
        shapes += [(4, 128, 750, 1024, 32), (2, 64, 333, 2048, 17)]
    for shape in shapes:
        check(f"rvq_encode B,D,T,K,Q={shape}", out, encode_case(*shape))

    def decode_case():
        books = make_books(32, 1024, 128, seed=1, device=device)
        codes = torch.randint(0, 1024, (32, 3, 500 if SIZES["big_checks"] else 20), device=device)
        with ops.use_backend("torch"):
            ref = rvq.rvq_decode(codes, list(books))
        with ops.use_backend("triton"):
            got = rvq.rvq_decode(codes, list(books))
        if not torch.equal(ref, got):
            raise AssertionError(f"max diff {float((ref - got).abs().max())}")
        return "bit-exact"
    check("rvq_decode 32 x 1024 x 128", out, decode_case)

    def assign_case():
        books = make_books(1, 1024, 128, seed=2, device=device)
        x = make_latents(books, 1, 5000 if SIZES["big_checks"] else 100, seed=2)[0].t()
        norm = books[0].pow(2).sum(-1)
        with ops.use_backend("torch"):
            c, q, n, s = rvq.vq_assign(x, books[0], norm, stats=True)
        with ops.use_backend("triton"):
            kc, kq, kn, ks = rvq.vq_assign(x, books[0], norm, stats=True)
        agreement = rvq.code_agreement(x.t()[None], books, c.view(1, 1, -1), kc.view(1, 1, -1))
        if agreement.non_ties:
            raise AssertionError(str(agreement))
        if agreement.equal == agreement.rows:
            if not (torch.equal(q, kq) and torch.equal(n, kn)):
                raise AssertionError("codewords or counts differ")
            torch.testing.assert_close(ks, s, rtol=1e-5, atol=1e-5)
        return f"{agreement.equal}/{agreement.rows} equal"
    check("vq_assign with EMA statistics", out, assign_case)

    def training_case():
        # No k-means here: with fewer frames than codewords it repeats frames, and repeated
        # codewords are exact ties that either side may break.
        torch.manual_seed(0)
        ref_q = ResidualVectorQuantizer(dimension=128, n_q=8, bins=1024, kmeans_init=False).to(device)
        ref_q.train()
        fast_q = copy.deepcopy(ref_q)
        g = torch.Generator(device=device).manual_seed(1)
        for step in range(3):
            x = torch.randn(*SIZES["train"][:1], 128, SIZES["train"][1], generator=g, device=device)
            books = torch.stack([layer._codebook.embed.detach().clone() for layer in ref_q.vq.layers])
            res = []
            for backend, model in (("torch", ref_q), ("triton", fast_q)):
                xin = x.clone().requires_grad_(True)
                torch.manual_seed(100 + step)  # dead-code expiry draws random frames
                with ops.use_backend(backend):
                    r = model(xin, sample_rate=75)
                (r.quantized.pow(2).mean() + r.penalty.sum()).backward()
                res.append((r, xin.grad))
            (a, ga), (b, gb) = res
            if not torch.equal(a.codes, b.codes):
                agreement = rvq.code_agreement(x, books, a.codes, b.codes)
                if agreement.non_ties:
                    raise AssertionError(f"step {step}: {agreement}")
                return f"step {step}: {agreement.ties} ties (state diverges from there; not compared further)"
            torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-7)
            for (name, x1), (_, x2) in zip(ref_q.named_buffers(), fast_q.named_buffers()):
                torch.testing.assert_close(x2, x1, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        return "3 steps: codes equal, gradients and EMA buffers close"
    check("quantizer training step, triton vs torch", out, training_case)

    def model_case():
        model = random_model(device)
        model.set_target_bandwidth(6.0)
        x = test_audio(2 if SIZES["big_checks"] else 1, int(24000 * SIZES["model"][1]), device)
        with torch.no_grad():
            with ops.use_backend("torch"):
                emb_ref = model.encoder(x)
                ref = model.encode(x)[0][0]
                audio_ref = model.decode([(ref, None)])
            with ops.use_backend("triton"):
                emb = model.encoder(x)
                got = model.encode(x)[0][0]
                own = model.quantizer.encode(emb, model.frame_rate, 6.0)
                audio = model.decode([(ref, None)])
            with ops.use_backend("torch"):
                own_ref = model.quantizer.encode(emb, model.frame_rate, 6.0)
        books, _ = model.quantizer.vq.stacked_codebooks(ref.shape[1])
        # The RVQ kernel on the kernels' latents: ties only. Convolutions: latents and audio close.
        agreement = rvq.code_agreement(emb, books, own_ref, own)
        if agreement.non_ties or not torch.equal(own, got.transpose(0, 1)):
            raise AssertionError(str(agreement))
        emb_err = float((emb - emb_ref).abs().max() / emb_ref.abs().max())
        audio_err = float((audio - audio_ref).abs().max() / audio_ref.abs().max())
        if emb_err > 1e-5 or audio_err > 1e-5:
            raise AssertionError(f"latents rel. error {emb_err:.1e}, audio {audio_err:.1e}")
        same = float((got == ref).float().mean())
        return (f"RVQ: {agreement.equal}/{agreement.rows} frames equal, {agreement.ties} ties; latents "
                f"{emb_err:.1e}, audio {audio_err:.1e} rel. error; codes equal to the torch path: {same:.4f}")
    check("24 kHz model end to end, 6 kbps", out, model_case)
    return out


def random_model(device: str) -> EncodecModel:
    """The 24 kHz model with random weights and codebooks spread like latents (never zeros)."""
    torch.manual_seed(0)
    model = EncodecModel.encodec_model_24khz(pretrained=False).to(device).eval()
    with torch.no_grad():
        emb = model.encoder(test_audio(4, 24000, device)).transpose(1, 2).reshape(-1, 128)
        residual = emb
        for layer in model.quantizer.vq.layers:
            cb = layer._codebook
            idx = torch.randint(0, residual.shape[0], (cb.embed.shape[0],), device=device)
            cb.embed.copy_(residual[idx] * (0.6 + 0.8 * torch.rand(cb.embed.shape[0], 1, device=device)))
            residual = residual - cb.decode(cb.encode(residual))
    return model


def test_audio(batch: int, length: int, device: str) -> torch.Tensor:
    """Harmonic tones with vibrato and noise bursts (not silence) [batch, 1, length]."""
    g = torch.Generator().manual_seed(batch * 7 + length)
    t = torch.arange(length) / 24000
    out = []
    for _ in range(batch):
        f0 = 100 + 120 * torch.rand(1, generator=g)
        phase = 2 * math.pi * torch.cumsum(f0 * (1 + 0.2 * torch.sin(2 * math.pi * 0.7 * t)), 0) / 24000
        voice = sum(torch.sin(h * phase) / h for h in range(1, 10))
        noise = 0.05 * torch.randn(length, generator=g)
        out.append(0.3 * voice * (0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t).clamp_min(0)) + noise)
    return torch.stack(out)[:, None].to(device)


# -- 2. timings ------------------------------------------------------------------------------------

def time_rvq(device: str, quick: bool, peaks: tp.Optional[dict]) -> list:
    rows = []
    (B, T), D, K = SIZES["rvq"], 128, 1024  # 64 x 10 s at 75 frames/s
    for Q, kbps in ((8, 6), (32, 24)):
        books = make_books(Q, K, D, seed=Q, device=device)
        x = make_latents(books, B, T, seed=Q)
        embeds, norms = list(books), [b.pow(2).sum(-1)[None] for b in books]
        N = B * T
        with ops.use_backend("torch"):
            ref = rvq.rvq_encode(x, embeds, norms)
            torch_ms = bench_ms(lambda: rvq.rvq_encode(x, embeds, norms), quick)
            codes = ref
            torch_dec_ms = bench_ms(lambda: rvq.rvq_decode(codes, embeds), quick)
        stacked = (books.contiguous(), torch.stack([n.view(-1) for n in norms]))
        flops = 2.0 * N * K * D * Q
        for precision in ("ieee", "tf32x3", "tf32"):
            with ops.use_backend("triton"), Precision(precision):
                got = rvq.rvq_encode(x, embeds, norms, stacked=lambda: stacked)
                ms, launches = bench_ms_launches(lambda: rvq.rvq_encode(x, embeds, norms, stacked=lambda: stacked),
                                                 quick)
            agreement = rvq.code_agreement(x, books, ref, got)
            peak = None if peaks is None else peaks["fp32" if precision == "ieee" else "tf32"]
            rows.append({
                "op": "rvq_encode", "kbps": kbps, "stages": Q, "frames": N, "precision": precision,
                "torch_ms": torch_ms, "triton_ms": ms, "speedup": torch_ms / ms,
                "tflops": flops / ms / 1e9, "roofline_fraction": None if peak is None else flops / ms / 1e9 / peak,
                "frames_equal": agreement.equal / agreement.rows, "ties": agreement.ties,
                "non_ties": agreement.non_ties, "launches": launches})
        with ops.use_backend("triton"):
            ms, launches = bench_ms_launches(lambda: rvq.rvq_decode(codes, embeds, stacked=lambda: stacked), quick)
        nbytes = N * Q * 8 + N * D * 4  # codes read, output written (codebooks stay in L2)
        rows.append({"op": "rvq_decode", "kbps": kbps, "stages": Q, "frames": N, "precision": "fp32",
                     "torch_ms": torch_dec_ms, "triton_ms": ms, "speedup": torch_dec_ms / ms,
                     "gbs": nbytes / ms / 1e6, "launches": launches,
                     "roofline_fraction": None if peaks is None else nbytes / ms / 1e9 / peaks["hbm_tbs"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# (name, C_in, C_out, K, stride, dilation, input length at 24 kHz x 10 s, residual, transposed)
CONV_LAYERS = [
    ("enc first conv", 1, 32, 7, 1, 1, 240000, False, False),
    ("enc res k3", 32, 16, 3, 1, 1, 240000, False, False),
    ("enc res k1 + skip", 16, 32, 1, 1, 1, 240000, True, False),
    ("enc down s2", 32, 64, 4, 2, 1, 240000, False, False),
    ("enc down s4", 64, 128, 8, 4, 1, 120000, False, False),
    ("enc down s5", 128, 256, 10, 5, 1, 30000, False, False),
    ("enc down s8", 256, 512, 16, 8, 1, 6000, False, False),
    ("enc last conv", 512, 128, 7, 1, 1, 750, False, False),
    ("dec up s8", 512, 256, 16, 8, 1, 750, False, True),
    ("dec up s5", 256, 128, 10, 5, 1, 6000, False, True),
    ("dec up s4", 128, 64, 8, 4, 1, 30000, False, True),
    ("dec up s2", 64, 32, 4, 2, 1, 120000, False, True),
    ("dec last conv", 32, 1, 7, 1, 1, 240000, False, False),
]


def conv_case(device: str, layer: tuple, dtype: torch.dtype):
    """(triton fn, torch fn, name, flops) for one of CONV_LAYERS at batch 64 x 10 s (smoke: tiny):
    ELU + pad + conv (+ skip) as separate torch ops (cuDNN) against the fused kernel."""
    from encodec_fast.ops import conv
    name, C_in, C_out, K, s, d, L, residual, transposed = layer
    batch = SIZES["rvq"][0]
    scale_len = 1.0 if SIZES["big_checks"] else 1 / 2000
    L = max(4 * K, int(L * scale_len))
    if not SIZES["big_checks"]:  # smoke: fewer channels too
        C_in, C_out = max(1, C_in // 8), max(1, C_out // 8)
    g = torch.Generator(device=device).manual_seed(C_in + C_out)
    x = torch.randn(batch, C_in, L, device=device, generator=g).to(dtype)
    if transposed:
        w = (torch.randn(C_in, C_out, K, device=device, generator=g) / (C_in * 2) ** 0.5).to(dtype)
        b = torch.zeros(C_out, device=device, dtype=dtype)
        total = K - s
        start, length = total - total // 2, (L - 1) * s + K - total
        args = (x, w, b, s, start, length, True)
        ref_fn, fn = conv.conv_transpose1d_torch, conv.conv_transpose1d
        flops = 2.0 * batch * L * C_in * C_out * K
    else:
        w = (torch.randn(C_out, C_in, K, device=device, generator=g) / (C_in * K) ** 0.5).to(dtype)
        b = torch.zeros(C_out, device=device, dtype=dtype)
        p = (K - 1) * d - (s - 1)
        extra = math.ceil(L / s) * s - L
        pads = (p - p // 2, p // 2 + extra)
        T = math.ceil(L / s)
        res = torch.randn(batch, C_out, T, device=device, generator=g).to(dtype) if residual else None
        args = (x, w, b, s, d, pads, "reflect", K > 1, res)
        ref_fn, fn = conv.conv1d_torch, conv.conv1d
        flops = 2.0 * batch * T * C_in * C_out * K
    return (lambda: fn(*args)), (lambda: ref_fn(*args)), name, flops, [batch, C_in, L]


def time_convs(device: str, quick: bool, peaks: tp.Optional[dict]) -> list:
    """Each SEANet convolution kind at batch 64 x 10 s (24 kHz): ELU + pad + conv (+ skip) as
    separate torch ops (cuDNN) against the fused kernel, fp32 (exact products) and bf16."""
    rows = []
    for layer in CONV_LAYERS:
        for dtype in (torch.float32, torch.bfloat16):
            fn, ref_fn, name, flops, shape = conv_case(device, layer, dtype)
            with torch.no_grad():
                ref = ref_fn()
                with ops.use_backend("triton"):
                    got = fn()
                err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
                torch_ms = bench_ms(ref_fn, quick)
                with ops.use_backend("triton"):
                    ms, launches = bench_ms_launches(fn, quick)
            peak = None if peaks is None else peaks["fp32" if dtype == torch.float32 else "bf16"]
            rows.append({"op": f"conv: {name}", "dtype": str(dtype).replace("torch.", ""), "shape": shape,
                         "torch_ms": torch_ms, "triton_ms": ms, "speedup": torch_ms / ms, "rel_err": err,
                         "tflops": flops / ms / 1e9, "launches": launches,
                         "roofline_fraction": None if peak is None else flops / ms / 1e9 / peak})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def time_stft(device: str, quick: bool) -> list:
    """The MS-STFT discriminator's spectrogram front end (forward + backward) and the whole
    discriminator (forward + backward), torch vs the Triton layout kernel, at a training batch."""
    from encodec_fast.ops import stft
    from encodec_fast.train import MultiScaleSTFTDiscriminator
    batch, seconds = (SIZES["train"][0], 1.0) if SIZES["big_checks"] else (1, 0.1)
    x = torch.randn(batch, 1, int(24000 * seconds), device=device)
    rows = []
    for n_fft, hop in ((1024, 256), (2048, 512), (512, 128)):
        window = torch.hann_window(n_fft, device=device)

        def step(backend):
            xin = x.clone().requires_grad_(True)
            with ops.use_backend(backend):
                z = stft.spectrogram(xin, window, n_fft, hop, n_fft, True)
            z.sum().backward()
            return z
        ref, got = step("torch"), step("triton")
        err = float((got - ref).abs().max() / ref.abs().max())
        entry = {"op": f"spectrogram n_fft={n_fft} fwd+bwd", "torch_ms": bench_ms(lambda: step("torch"), quick),
                 "rel_err": err}
        entry["triton_ms"], entry["launches"] = bench_ms_launches(lambda: step("triton"), quick)
        entry["speedup"] = entry["torch_ms"] / entry["triton_ms"]
        rows.append(entry)
        print(json.dumps(entry), flush=True)
    torch.manual_seed(0)
    filters = 32 if SIZES["big_checks"] else 8
    disc = MultiScaleSTFTDiscriminator(filters=filters).to(device)

    def disc_step(backend):
        with ops.use_backend(backend):
            logits, fmaps = disc(x)
        (sum(lg.mean() for lg in logits) + sum(f.mean() for fm in fmaps for f in fm)).backward()
    entry = {"op": f"MS-STFT discriminator fwd+bwd (filters={filters}; triton: spectrogram kernel + fused Conv2d)",
             "torch_ms": bench_ms(lambda: disc_step("torch"), quick),
             "triton_ms": bench_ms(lambda: disc_step("triton"), quick), "rel_err": None}
    entry["speedup"] = entry["torch_ms"] / entry["triton_ms"]
    rows.append(entry)
    print(json.dumps(entry), flush=True)
    return rows


def time_conv2d(device: str, quick: bool, peaks: tp.Optional[dict]) -> list:
    """The discriminator's Conv2d + LeakyReLU layers (n_fft=1024 scale, filters=32, a training
    batch): cuDNN conv + LeakyReLU against the fused kernel, forward alone and forward + backward
    (the kernel's backward is torch's), fp32 and bf16. The shapes are read off the module."""
    from encodec_fast.ops import conv
    from encodec_fast.train.msstftd import DiscriminatorSTFT
    batch, seconds = (SIZES["train"][0], 1.0) if SIZES["big_checks"] else (1, 0.1)
    torch.manual_seed(0)
    disc = DiscriminatorSTFT(filters=32 if SIZES["big_checks"] else 8).to(device)
    seen: list = []
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.append((m, inp[0].detach())))
             for m in list(disc.convs) + [disc.conv_post]]
    with torch.no_grad():
        disc(torch.randn(batch, 1, int(24000 * seconds), device=device))
    for h in hooks:
        h.remove()
    rows = []
    for i, (module, x) in enumerate(seen):
        c = module.conv
        slope = None if module is disc.conv_post else 0.2
        w = module.weight().detach()
        cfg = (c.stride, c.dilation, c.padding, slope)
        B, C_in, H, W = x.shape
        for dtype in (torch.float32, torch.bfloat16):
            xd, wd, bd = x.to(dtype), w.to(dtype), c.bias.detach().to(dtype)
            def fwd(backend):
                with torch.no_grad(), ops.use_backend(backend):
                    return conv.conv2d_leaky_relu(xd, wd, bd, *cfg)

            def fwd_bwd(backend):
                xin, win = xd.clone().requires_grad_(True), wd.clone().requires_grad_(True)
                with ops.use_backend(backend):
                    y = conv.conv2d_leaky_relu(xin, win, bd, *cfg)
                y.backward(torch.ones_like(y))
            ref, got = fwd("torch"), fwd("triton")
            err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
            flops = 2.0 * B * ref.shape[2] * ref.shape[3] * C_in * ref.shape[1] * c.kernel_size[0] * c.kernel_size[1]
            entry = {"op": f"conv2d{'+lrelu' if slope else ''} #{i}", "dtype": str(dtype).replace("torch.", ""),
                     "shape": [B, C_in, H, W], "out_channels": ref.shape[1], "kernel": list(c.kernel_size),
                     "stride": list(c.stride), "dilation": list(c.dilation), "rel_err": err,
                     "torch_fwd_ms": bench_ms(lambda: fwd("torch"), quick),
                     "torch_fwd_bwd_ms": bench_ms(lambda: fwd_bwd("torch"), quick),
                     "triton_fwd_bwd_ms": bench_ms(lambda: fwd_bwd("triton"), quick)}
            entry["triton_fwd_ms"], entry["launches"] = bench_ms_launches(lambda: fwd("triton"), quick)
            entry["fwd_speedup"] = entry["torch_fwd_ms"] / entry["triton_fwd_ms"]
            entry["fwd_bwd_speedup"] = entry["torch_fwd_bwd_ms"] / entry["triton_fwd_bwd_ms"]
            entry["triton_fwd_tflops"] = flops / entry["triton_fwd_ms"] / 1e9
            peak = None if peaks is None else peaks["fp32" if dtype == torch.float32 else "bf16"]
            entry["roofline_fraction"] = None if peak is None else entry["triton_fwd_tflops"] / peak
            rows.append(entry)
            print(json.dumps(entry), flush=True)
    return rows


def time_training(device: str, quick: bool) -> list:
    rows = []
    for n_q in (8, 32):
        torch.manual_seed(0)
        ours = ResidualVectorQuantizer(dimension=128, n_q=n_q, bins=1024, kmeans_init=False).to(device).train()
        x = torch.randn(SIZES["train"][0], 128, SIZES["train"][1], device=device)

        def step(model, backend=None):
            xin = x.clone().requires_grad_(True)
            if backend is None:
                res = model(xin, sample_rate=75)
                loss = res.quantized.pow(2).mean() + res.penalty.sum()
            else:
                with ops.use_backend(backend):
                    res = model(xin, 75)
                    loss = res.quantized.pow(2).mean() + res.penalty.sum()
            loss.backward()

        entry = {"op": "quantizer training step", "stages": n_q, "frames": x.shape[0] * x.shape[2]}
        model = copy.deepcopy(ours)
        entry["ours_torch_ms"] = bench_ms(lambda: step(model, "torch"), quick)
        model = copy.deepcopy(ours)
        entry["ours_triton_ms"], entry["launches"] = bench_ms_launches(lambda: step(model, "triton"), quick)
        try:
            from encodec.quantization import ResidualVectorQuantizer as Upstream
            upstream = Upstream(dimension=128, n_q=n_q, bins=1024, kmeans_init=False).to(device).train()
            upstream.load_state_dict(ours.state_dict())
            entry["upstream_ms"] = bench_ms(lambda: step(upstream), quick)
            entry["speedup_vs_upstream"] = entry["upstream_ms"] / entry["ours_triton_ms"]
        except ImportError:
            entry["upstream_ms"] = None
            entry["note"] = "encodec not installed: no upstream timing"
        entry["speedup_vs_torch_backend"] = entry["ours_torch_ms"] / entry["ours_triton_ms"]
        rows.append(entry)
        print(json.dumps(entry), flush=True)
    return rows


def time_train_step(device: str, quick: bool) -> list:
    """The whole training step of the 24 kHz model (bench/train_step.py): ours in fp32 with the
    Triton quantizer, with the torch quantizer, in bf16, and the step built from upstream's modules."""
    import argparse as _argparse

    from bench import train_step
    args = _argparse.Namespace(model="24khz", batch=1 if SMOKE else 2 if quick else 16, seconds=0.5 if SMOKE else 1.0,
                               reps=1 if quick else 5, bandwidths=[6.0] if SMOKE else [6.0, 24.0], device=device)
    rows = train_step.run(args)
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k != "times_ms"}), flush=True)
    return rows


def time_model(device: str, quick: bool) -> list:
    model = random_model(device)
    batch, duration = SIZES["model"]
    x = test_audio(batch, int(24000 * duration), device)
    seconds = batch * duration
    reps = 1 if SMOKE else 2 if quick else 5
    rows = []
    with torch.no_grad():
        for kbps in (6.0,) if SMOKE else (6.0, 24.0):
            model.set_target_bandwidth(kbps)
            with ops.use_backend("torch"):
                ref = model.encode(x)
            entry: dict = {"op": f"24 kHz model, {batch} x {duration} s", "kbps": kbps}
            for label, backend, dtype in (("torch_fp32", "torch", None), ("triton_fp32", "triton", None),
                                          ("triton_bf16", "triton", torch.bfloat16)):
                def run(fn, backend=backend, dtype=dtype):
                    with ops.use_backend(backend), torch.autocast(device, dtype=dtype or torch.float32,
                                                                  enabled=dtype is not None):
                        return fn()
                result = {}

                def encode(run=run, result=result):
                    result["frames"] = run(lambda: model.encode(x))
                if label == "triton_fp32":
                    enc_s, entry["launches_encode"] = timed_launches(encode, reps)
                    dec_s, entry["launches_decode"] = timed_launches(lambda: run(lambda: model.decode(ref)), reps)
                else:
                    enc_s = timed_seconds(encode, reps)
                    dec_s = timed_seconds(lambda: run(lambda: model.decode(ref)), reps)
                codes = result["frames"][0][0]  # the last timed call's
                entry[f"{label}_encode_audio_s_per_s"] = seconds / enc_s
                entry[f"{label}_decode_audio_s_per_s"] = seconds / dec_s
                # Against the torch path's codes; the Triton convolutions' latents differ in the last
                # bits, so a few codes on codeword boundaries differ (ties are checked in `correctness`).
                entry[f"{label}_codes_equal_to_fp32"] = float((codes == ref[0][0]).float().mean())
            entry["encode_speedup_triton_fp32"] = (entry["triton_fp32_encode_audio_s_per_s"]
                                                   / entry["torch_fp32_encode_audio_s_per_s"])
            rows.append(entry)
            print(json.dumps(entry), flush=True)
    return rows


# -- 3. report -------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    lines = [f"# GPU benchmark ({report['date']})", "",
             f"Device: {report['device']}; torch {report['torch']}, triton {report['triton']}, "
             f"CUDA {report['cuda']}; Python {report['python']}. Launch configurations: "
             f"**{report.get('configs', 'default')}** ({CONFIG_TEXT[report.get('configs', 'default')]}); stages run: "
             f"{', '.join(report.get('stages_run', []))}"
             + (f"; skipped for the time budget: {', '.join(report['stages_skipped'])}"
                if report.get("stages_skipped") else "")
             + ".", "",
             "## Correctness on the GPU", "", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'pass' if c['ok'] else 'FAIL'} | {c['detail']} |" for c in report["checks"]]
    lines += ["", "## RVQ kernels (median ms, do_bench)", "",
              "| op | kbps | precision | torch ms | triton ms | speed-up | TFLOP/s or GB/s | roofline | frames equal "
              "| ties | non-ties | launch: config, resources |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("rvq", []):
        rate = f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else f"{r['gbs']:.0f} GB/s"
        roof = "-" if r.get("roofline_fraction") is None else f"{100 * r['roofline_fraction']:.0f}%"
        lines.append(f"| {r['op']} | {r['kbps']} | {r['precision']} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | "
                     f"{r['speedup']:.2f}x | {rate} | {roof} | {r.get('frames_equal', 1.0):.4f} | "
                     f"{r.get('ties', '-')} | {r.get('non_ties', '-')} | {launch_text(r.get('launches', []))} |")
    lines += ["", "## Fused convolutions: ELU + pad + conv (+ skip) in torch (cuDNN) vs one kernel (median ms)", "",
              "| layer | dtype | input | torch ms | triton ms | speed-up | TFLOP/s | roofline | max rel. error "
              "| launch: config, resources |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("conv", []):
        roof = "-" if r.get("roofline_fraction") is None else f"{100 * r['roofline_fraction']:.0f}%"
        lines.append(f"| {r['op'][6:]} | {r['dtype']} | {'x'.join(map(str, r['shape']))} | {r['torch_ms']:.3f} | "
                     f"{r['triton_ms']:.3f} | {r['speedup']:.2f}x | {r['tflops']:.1f} | {roof} | {r['rel_err']:.1e} | "
                     f"{launch_text(r.get('launches', []))} |")
    lines += ["", "## MS-STFT discriminator (median ms)", "", "| op | torch ms | triton ms | speed-up |",
              "|---|---|---|---|"]
    for r in report.get("stft", []):
        lines.append(f"| {r['op']} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | {r['speedup']:.2f}x |")
    lines += ["", "## Discriminator Conv2d + LeakyReLU: cuDNN + LeakyReLU vs the fused kernel (median ms)", "",
              "| layer | dtype | input | torch fwd | triton fwd | speed-up | torch fwd+bwd | triton fwd+bwd "
              "| speed-up | "
              "TFLOP/s | roofline | max rel. error | launch: config, resources |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("conv2d", []):
        roof = "-" if r.get("roofline_fraction") is None else f"{100 * r['roofline_fraction']:.0f}%"
        lines.append(f"| {r['op']} | {r['dtype']} | {'x'.join(map(str, r['shape']))} | {r['torch_fwd_ms']:.3f} | "
                     f"{r['triton_fwd_ms']:.3f} | {r['fwd_speedup']:.2f}x | {r['torch_fwd_bwd_ms']:.3f} | "
                     f"{r['triton_fwd_bwd_ms']:.3f} | {r['fwd_bwd_speedup']:.2f}x | {r['triton_fwd_tflops']:.1f} | "
                     f"{roof} | {r['rel_err']:.1e} | {launch_text(r.get('launches', []))} |")
    lines += ["", "## Quantizer training step (forward + backward + EMA, median ms)", "",
              "| stages | upstream | ours torch | ours triton | vs upstream | vs torch backend |",
              "|---|---|---|---|---|---|"]
    for r in report.get("training", []):
        up = "-" if r["upstream_ms"] is None else f"{r['upstream_ms']:.2f}"
        vs = "-" if r["upstream_ms"] is None else f"{r['speedup_vs_upstream']:.2f}x"
        lines.append(f"| {r['stages']} | {up} | {r['ours_torch_ms']:.2f} | {r['ours_triton_ms']:.2f} | {vs} | "
                     f"{r['speedup_vs_torch_backend']:.2f}x |")
    lines += ["", "## Training step, 24 kHz model, discriminator update every step (median ms)", "",
              "| kbps | implementation | median ms | quantizer share | upstream modules / this |",
              "|---|---|---|---|---|"]
    base = {r["kbps"]: r["median_ms"] for r in report.get("train_step",
                                                          []) if r["implementation"] == "upstream modules"}
    for r in report.get("train_step", []):
        ratio = f"{base[r['kbps']] / r['median_ms']:.2f}x" if r["kbps"] in base else "-"
        lines.append(f"| {r['kbps']:g} | {r['implementation']} | {r['median_ms']:.1f} | "
                     f"{100 * r['quantizer_share']:.1f}% | {ratio} |")
    if report.get("autotune_picks"):
        lines += ["", "## Autotune picks (fastest listed configuration per tuning key)", "",
                  "| kernel | size class | key | configuration |", "|---|---|---|---|"]
        for p in report["autotune_picks"]:
            lines.append(f"| {p['kernel']} | {p['size_class']} | {' '.join(p['key'])} | "
                         f"{' '.join(f'{k}={v}' for k, v in p['config'].items())} |")
    lines += ["", "## Whole model (seconds of audio per second)", "",
              "| model | kbps | mode | encode | decode | codes equal to torch fp32 |", "|---|---|---|---|---|---|"]
    for r in report.get("model", []):
        for label in ("torch_fp32", "triton_fp32", "triton_bf16"):
            lines.append(f"| {r['op']} | {r['kbps']} | {label} | {r[label + '_encode_audio_s_per_s']:.1f} | "
                         f"{r[label + '_decode_audio_s_per_s']:.1f} | {r[label + '_codes_equal_to_fp32']:.4f} |")
    return "\n".join(lines) + "\n"


def error_checks(rows: list) -> list:
    """A check per timed convolution: its output within 1e-5 (fp32) or 2e-2 (bf16) of torch's."""
    checks = []
    for r in rows:
        limit = 1e-5 if r["dtype"] == "float32" else 2e-2
        checks.append({"check": f"{r['op']} {r['dtype']} vs torch", "ok": r["rel_err"] <= limit,
                       "detail": f"max rel. error {r['rel_err']:.1e} (limit {limit:.0e})"})
    return checks


CONFIG_TEXT = {
    "default": "the no-spill table in the kernel wrappers",
    "legacy": "before the compile check: RVQ 64 x 64 blocks, 4 warps; convolutions 4 warps, 3 stages",
    "autotune": "ENCODEC_FAST_AUTOTUNE=1, triton.autotune over the listed configurations",
}
STAGES = ("correctness", "rvq", "conv", "stft", "conv2d", "training", "train_step", "model")


def legacy_configs() -> None:
    """The launch configurations before issue 13's compile check, patched into the wrappers."""
    import triton
    from encodec_fast.kernels import conv as kconv
    from encodec_fast.kernels import rvq as krvq

    from encodec_fast.ops.backend import interpreting
    default_blocks, default_config = kconv._blocks, krvq._config

    def blocks(C_in, C_out, T, kind="conv1d"):
        if interpreting():
            return default_blocks(C_in, C_out, T, kind)
        return (min(64, max(16, triton.next_power_of_2(C_out))), min(32, max(16, triton.next_power_of_2(C_in))),
                128 if T >= 128 else max(16, triton.next_power_of_2(T)), 4, 3)

    def config(N, D, K, encode, half_input=False):
        if interpreting():
            return default_config(N, D, K, encode, half_input)
        block_d = krvq._block_d(D)
        block_n = min(64 if block_d <= 128 else 32, max(16, triton.next_power_of_2(N)))
        block_k = min(64 if block_d <= 128 else 32, max(16, triton.next_power_of_2(K)))
        return block_n, block_k, 4, 3
    kconv._blocks, krvq._config = blocks, config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--configs", choices=tuple(CONFIG_TEXT), default="default")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated among {','.join(STAGES)}")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="start no stage after this many seconds (what finished is saved)")
    parser.add_argument("--smoke", action="store_true",
                        help="no GPU: tiny shapes on CPU under TRITON_INTERPRET=1, to check the script runs")
    args = parser.parse_args()
    stages = [x for x in args.stages.split(",") if x]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose among {STAGES}")
    global SMOKE, SIZES
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
            return 2
        SMOKE, SIZES = True, SMOKE_SIZES
    elif not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    import triton
    if args.configs == "legacy":
        legacy_configs()
    elif args.configs == "autotune":
        os.environ["ENCODEC_FAST_AUTOTUNE"] = "1"
    else:
        os.environ.pop("ENCODEC_FAST_AUTOTUNE", None)
    LaunchLog.install()
    torch.backends.cuda.matmul.allow_tf32 = False  # the torch path is exact fp32, as the reference
    torch.backends.cudnn.allow_tf32 = False
    device = "cpu" if SMOKE else "cuda"
    name = "CPU (smoke run, Triton interpreter)" if SMOKE else torch.cuda.get_device_name()
    report: tp.Dict[str, tp.Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": name,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "host": platform.node(), "configs": args.configs,
        "quick": args.quick, "stages_run": [], "stages_skipped": [], "checks": [], "peaks": peaks_for(name),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_{datetime.date.today().isoformat()}_{args.configs}" + ("_smoke" if SMOKE else "")

    def save() -> None:
        from encodec_fast.kernels import tuning
        report["autotune_picks"] = tuning.chosen()
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
        (args.out / f"{stem}.md").write_text(markdown(report))

    peaks = report["peaks"]
    t0 = time.perf_counter()
    for stage in STAGES:
        if stage not in stages:
            continue
        elapsed = time.perf_counter() - t0
        if args.budget_seconds is not None and elapsed > args.budget_seconds:
            report["stages_skipped"].append(stage)
            print(f"[{elapsed:6.1f} s] {stage}: skipped (past the {args.budget_seconds:.0f} s budget)", flush=True)
            continue
        print(f"[{elapsed:6.1f} s] {stage}", flush=True)
        try:
            if stage == "correctness":
                report["checks"] += correctness(device)
            elif stage == "rvq":
                report["rvq"] = time_rvq(device, args.quick, peaks)
            elif stage == "conv":
                report["conv"] = time_convs(device, args.quick, peaks)
                report["checks"] += error_checks(report["conv"])
            elif stage == "stft":
                report["stft"] = time_stft(device, args.quick)
                report["checks"] += [{"check": f"{r['op']} vs torch", "ok": r["rel_err"] <= 1e-5,
                                      "detail": f"max rel. error {r['rel_err']:.1e} (limit 1e-05)"}
                                     for r in report["stft"] if r["rel_err"] is not None]
            elif stage == "conv2d":
                report["conv2d"] = time_conv2d(device, args.quick, peaks)
                report["checks"] += error_checks(report["conv2d"])
            elif stage == "training":
                report["training"] = time_training(device, args.quick)
            elif stage == "train_step":
                report["train_step"] = time_train_step(device, args.quick)
            elif stage == "model":
                report["model"] = time_model(device, args.quick)
        except Exception as exc:  # a stage that breaks is a result: record it, go on with the next
            traceback.print_exc()
            report["checks"].append({"check": f"stage {stage} ran", "ok": False,
                                     "detail": f"{type(exc).__name__}: {exc}"})
        report["stages_run"].append(stage)
        report["seconds"] = time.perf_counter() - t0
        save()
    print(f"[{time.perf_counter() - t0:6.1f} s] done", flush=True)
    save()
    print(markdown(report))
    return 0 if all(c["ok"] for c in report["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
