"""`kernels`: every Triton kernel against its PyTorch path on one CUDA device (cuDNN / cuBLAS in exact
fp32: TF32 off for the PyTorch side), with the launches each op made.

Timed with `triton.testing.do_bench` (median ms), each kernel beside its PyTorch path:
- `rvq`: RVQ encode and decode at batch 64 x 10 s of 24 kHz audio (48,000 frames, D=128, K=1024),
  6 kbps (8 stages) and 24 kbps (32 stages); precisions exact (the certified search, the default),
  ieee (fp32 on CUDA cores), tf32x3, tf32, with their code agreement against exact fp32; FLOPs,
  bytes and the fraction of the roofline;
- `conv`, `block`: each SEANet convolution kind, fused ELU + pad + conv (+ skip) against the separate
  torch ops, and the fused residual blocks and levels, in each codec mode (exact, tf32, fp16, bf16);
- `stft`, `conv2d`: the MS-STFT discriminator's spectrogram front end, each Conv2d + LeakyReLU layer
  (forward and forward + backward, fp32 and bf16), the whole discriminator;
- `training`: a quantizer training step (forward + backward, EMA update), ours on each backend and
  upstream's `core_vq` when `encodec` is importable;
- `train_step`: the whole training step (the `train_step` benchmark's), fp32 and bf16;
- `model`: whole-model 24 kHz encode and decode, audio seconds per second, torch fp32, Triton fp32
  and bf16 autocast with its code agreement.
Each Triton timing records the launches it made (kernel, block sizes, warps, stages) with the
compiled kernel's registers, local memory (spills and stack) and shared memory (`LaunchLog`).
ENCODEC_FAST_AUTOTUNE=1 times the autotuned configurations instead of the defaults (records say
which). Correctness on the GPU is the tests' job (`python -m pytest -m gpu`); here a kernel that loses
is reported as losing. In Triton's interpreter (TRITON_INTERPRET=1, device cpu) the stages run at
tiny sizes as a plumbing check.
"""

import copy
import math
import os
import statistics
import time
import typing as tp

import torch

from bench import launch_roofline, peers
from bench.benchmarks.train_step import TRAINER_PRECISION
from bench.core import Context, EnvSetting, benchmark, upstream_missing
from bench.peaks import MODE_PEAK, peaks_for, predicted_key, roofline_ms
from encodec_fast import ops
from encodec_fast import precision as precision_modes
from encodec_fast.ops import rvq
from encodec_fast.quantization import ResidualVectorQuantizer
from encodec_fast.testing import voice_batch

#: Sizes: the realistic ones, or tiny ones in Triton's interpreter (CPU; numbers mean nothing): `use_interpreter`.
FULL_SIZES = {"rvq": (64, 750), "train": (64, 75), "model": (64, 10.0), "big_checks": True}
SMOKE_SIZES = {"rvq": (2, 40), "train": (2, 20), "model": (1, 0.05), "big_checks": False}
SIZES, SMOKE = FULL_SIZES, False


def use_interpreter(on: bool) -> None:
    """Tiny sizes and single untimed calls (Triton's interpreter on CPU: a plumbing check), or the real ones."""
    global SIZES, SMOKE
    SIZES, SMOKE = (SMOKE_SIZES, True) if on else (FULL_SIZES, False)


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


class Precision(EnvSetting):
    """Set $ENCODEC_FAST_RVQ_PRECISION inside a block."""

    def __init__(self, value: str):
        super().__init__("ENCODEC_FAST_RVQ_PRECISION", value)


class LaunchLog:
    """Records the Triton launches made inside `record()`: kernel, constexpr block sizes, warps,
    stages and the compiled kernel's resources (from the driver: registers per thread, local memory
    per thread, which holds spills and stack, and shared memory per block), and, per distinct
    launch, its calls and their work and roofline added up (`bench.launch_roofline.accumulate`: calls,
    flop, bytes, predicted_ms_h100, predicted_ms_h200), to read next to the measured time."""

    active: tp.Optional[tp.Dict[str, dict]] = None
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
                name = getattr(self, "__name__", None) or self.fn.__name__
                try:
                    entry = {"kernel": name}
                    entry.update({k: v for k, v in kwargs.items() if k.startswith("BLOCK_")})
                    entry.update(num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages,
                                 registers=int(kernel.n_regs), local_bytes=4 * int(kernel.n_spills),
                                 shared_bytes=int(kernel.metadata.shared))
                except Exception as exc:  # never let the record break a benchmark
                    entry["error"] = repr(exc)
                entry = cls.active.setdefault(repr(sorted(entry.items())), entry)
                try:
                    work = launch_roofline.work(name, launch_roofline.bind(self, args, kwargs))
                except Exception as exc:
                    entry["work_error"] = repr(exc)
                    work = None
                if work is not None:
                    launch_roofline.accumulate(entry, work)
            return kernel
        JITFunction.run = run
        cls.installed = True

    @classmethod
    def of(cls, fn: tp.Callable[[], tp.Any]) -> list:
        """The distinct launches one call of fn makes."""
        cls.active = {}
        try:
            fn()
            sync()
            return list(cls.active.values())
        finally:
            cls.active = None


def predicted_ms(launches: tp.Sequence[dict], device_name: str) -> tp.Optional[float]:
    """The roofline of everything in `launches` (`LaunchLog.of`) on this GPU (H100 or H200 by its
    name; None for another, or where a launch has no work model)."""
    key = predicted_key(device_name)
    if key is None or not launches or any(key not in e for e in launches):
        return None
    return sum(e[key] for e in launches)


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
        for precision in ("exact", "ieee", "tf32x3", "tf32"):
            with ops.use_backend("triton"), Precision(precision):
                got = rvq.rvq_encode(x, embeds, norms, stacked=lambda: stacked)
                ms, launches = bench_ms_launches(lambda: rvq.rvq_encode(x, embeds, norms, stacked=lambda: stacked),
                                                 quick)
            agreement = rvq.code_agreement(x, books, ref, got)
            # exact: the certified search's tensor-core products (bf16x3 by default: 3 bf16 passes)
            lowp_peak = "bf16" if rvq.certify_with().startswith("bf16") else "tf32"
            kind = {"ieee": "fp32", "exact": lowp_peak}.get(precision, "tf32")
            peak = None if peaks is None else peaks[kind]
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
    """(triton fn, torch fn, name, flops, input shape, bytes) for one of CONV_LAYERS at batch 64 x 10 s
    (smoke: tiny): ELU + pad + conv (+ skip) as separate torch ops (cuDNN) against the fused
    kernel. bytes: the activations read and written once (input, output, residual; weights left out),
    the memory side of the layer's roofline."""
    from encodec_fast.ops import conv
    name, C_in, C_out, K, s, d, L, residual, transposed = layer
    batch = SIZES["rvq"][0]
    scale_len = 1.0 if SIZES["big_checks"] else 1 / 2000
    L = max(4 * K, int(L * scale_len))
    if not SIZES["big_checks"]:  # smoke: fewer channels too
        C_in, C_out = max(1, C_in // 8), max(1, C_out // 8)
    g = torch.Generator(device=device).manual_seed(C_in + C_out)
    x = torch.randn(batch, C_in, L, device=device, generator=g).to(dtype)
    size = torch.empty(0, dtype=dtype).element_size()
    if transposed:
        w = (torch.randn(C_in, C_out, K, device=device, generator=g) / (C_in * 2) ** 0.5).to(dtype)
        b = torch.zeros(C_out, device=device, dtype=dtype)
        total = K - s
        start, length = total - total // 2, (L - 1) * s + K - total
        args = (x, w, b, s, start, length, True)
        ref_fn, fn = conv.conv_transpose1d_torch, conv.conv_transpose1d
        flops = 2.0 * batch * L * C_in * C_out * K
        nbytes = size * batch * (C_in * L + C_out * length)
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
        nbytes = size * batch * (C_in * L + C_out * T * (2 if residual else 1))
    return (lambda: fn(*args)), (lambda: ref_fn(*args)), name, flops, [batch, C_in, L], nbytes


#: The codec's modes the convolution stages time (fp16 before bf16: the mode that keeps the codes,
#: docs/gpu.md, is measured first when the time budget runs short).
CONV_MODES = ("exact", "tf32", "fp16", "bf16")
#: The trainer's modes (`encodec-fast train --precision`), which the discriminator's stages time.
TRAIN_MODES = tuple(TRAINER_PRECISION)


def mode_dtype(mode: str) -> torch.dtype:
    """The activations' dtype of a precision mode: its autocast dtype, else fp32."""
    return precision_modes.AUTOCAST.get(mode, torch.float32)


def time_convs(device: str, quick: bool, peaks: tp.Optional[dict]) -> list:
    """Each SEANet convolution kind at batch 64 x 10 s (24 kHz), like for like in each precision
    mode (`encodec_fast.precision`: exact, tf32, fp16, bf16): ELU + pad + conv (+ skip) as separate torch
    ops (cuDNN with the mode's switches) against each kernel family (`direct`, `gemm`), with the
    layer's roofline on H100 and H200 next to the measured times."""
    rows = []
    for layer in CONV_LAYERS:
        for mode in CONV_MODES:
            dtype = mode_dtype(mode)
            fn, ref_fn, name, flops, shape, nbytes = conv_case(device, layer, dtype)
            with torch.no_grad(), precision_modes.scope(mode, device):
                ref = ref_fn()
                torch_ms = bench_ms(ref_fn, quick)
                for family in ("direct", "gemm"):
                    with EnvSetting("ENCODEC_FAST_CONV_KERNEL", family), ops.use_backend("triton"):
                        got = fn()
                        ms, launches = bench_ms_launches(fn, quick)
                    err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
                    peak = None if peaks is None else peaks[MODE_PEAK[mode]]
                    rows.append({"op": f"conv: {name}", "dtype": str(dtype).replace("torch.", ""), "precision": mode,
                                 "family": family, "shape": shape, "torch_ms": torch_ms, "triton_ms": ms,
                                 "speedup": torch_ms / ms, "rel_err": err, "tflops": flops / ms / 1e9,
                                 "gbs": nbytes / ms / 1e6, "launches": launches,
                                 "roofline_fraction": None if peak is None else flops / ms / 1e9 / peak,
                                 **roofline_ms(flops, nbytes, mode)})
    return rows


# (name, channels, input length at 24 kHz x 10 s): the encoder's residual blocks the fused kernel takes.
BLOCK_LAYERS = [("enc res block 0", 32, 240000), ("enc res block 1", 64, 120000)]


def block_bytes(C: int, L: int, batch: int, size: int) -> tp.Dict[str, float]:
    """Activation bytes one residual block moves (hidden H = C / 2; weights left out): torch's
    unfused ops (ELU, pad, k3 conv, ELU, k1 conv, shortcut conv, add: 12C + 4H per position), our
    per-convolution kernels with ELU, padding and the skip fused (5C + 2H), the fused block (2C)."""
    H = C // 2
    return {"torch": size * batch * L * (12 * C + 4 * H), "unfused": size * batch * L * (5 * C + 2 * H),
            "fused": size * batch * L * 2 * C}


def _block_case_weights(C: int, dtype: torch.dtype, g: torch.Generator, device: str):
    """w1 [C/2, C, 3], w2 [C, C/2, 1] and the shortcut's ws [C, C, 1] of a random residual block."""
    H = C // 2
    return ((torch.randn(H, C, 3, device=device, generator=g) / (3 * C) ** 0.5).to(dtype),
            (torch.randn(C, H, 1, device=device, generator=g) / H ** 0.5).to(dtype),
            (torch.randn(C, C, 1, device=device, generator=g) / C ** 0.5).to(dtype))


def _family_rows(op: str, mode: str, dtype: torch.dtype, shape: list, reference: tp.Callable[[], torch.Tensor],
                 families: tp.Sequence[tp.Tuple[str, str, tp.Callable[[], torch.Tensor], float, float]],
                 torch_bytes: float, quick: bool, peaks: tp.Optional[dict]) -> list:
    """One case of the `block` stage (inside its precision scope): torch's path (`reference`) timed
    once, then each (family, kernel family, fn, FLOP, bytes) on our kernels, with its error against
    the reference, throughput and roofline."""
    ref = reference()
    torch_ms = bench_ms(reference, quick)
    rows = []
    for family, kernel, fn, flops, nbytes in families:
        with EnvSetting("ENCODEC_FAST_CONV_KERNEL", kernel), ops.use_backend("triton"):
            got = fn()
            ms, launches = bench_ms_launches(fn, quick)
        err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
        rows.append({"op": op, "dtype": str(dtype).replace("torch.", ""), "precision": mode, "family": family,
                     "shape": shape, "torch_ms": torch_ms, "triton_ms": ms, "speedup": torch_ms / ms,
                     "rel_err": err, "tflops": flops / ms / 1e9, "gbs": nbytes / ms / 1e6, "bytes": nbytes,
                     "torch_bytes": torch_bytes, "launches": launches,
                     "roofline_fraction": None if peaks is None else nbytes / ms / 1e9 / peaks["hbm_tbs"],
                     **roofline_ms(flops, nbytes, mode)})
    return rows


def time_blocks(device: str, quick: bool, peaks: tp.Optional[dict]) -> list:
    """The encoder's residual blocks (shortcut k1 conv + ELU -> k3 conv -> ELU -> k1 conv, causal
    padding) at batch 64 x 10 s in each precision mode: torch's ops (cuDNN) against our kernels per
    convolution (`direct`, `gemm`) and the whole block in one kernel (`fused`), with the bytes each
    moves and the block's roofline."""
    from encodec_fast.ops import conv
    rows = []
    batch = SIZES["rvq"][0]
    for name, C, L in BLOCK_LAYERS:
        if not SIZES["big_checks"]:
            C, L = max(4, C // 8), 40
        H = C // 2
        for mode in CONV_MODES:
            dtype = mode_dtype(mode)
            g = torch.Generator(device=device).manual_seed(C)
            x = torch.randn(batch, C, L, device=device, generator=g).to(dtype)
            w1, w2, ws = _block_case_weights(C, dtype, g, device)
            b1, b2, bs = (torch.zeros(n, device=device, dtype=dtype) for n in (H, C, C))

            def unfused():
                skip = conv.conv1d(x, ws, bs)
                hidden = conv.conv1d(x, w1, b1, 1, 1, (2, 0), "reflect", True)
                return conv.conv1d(hidden, w2, b2, elu=True, residual=skip)

            def fused():
                return conv.residual_block(x, w1, b1, w2, b2, 1, (2, 0), "reflect", ws, bs)

            def reference():
                return conv.residual_block_torch(x, w1, b1, w2, b2, 1, (2, 0), "reflect", ws, bs)
            flops = 2.0 * batch * L * (3 * C * H + H * C + C * C)
            traffic = block_bytes(C, L, batch, torch.empty(0, dtype=dtype).element_size())
            with torch.no_grad(), precision_modes.scope(mode, device):
                rows += _family_rows(f"block: {name}", mode, dtype, [batch, C, L], reference,
                                     [("direct", "direct", unfused, flops, traffic["unfused"]),
                                      ("gemm", "gemm", unfused, flops, traffic["unfused"]),
                                      ("fused", "gemm", fused, flops, traffic["fused"])],
                                     traffic["torch"], quick, peaks)
    return rows + time_block_stages(device, quick, peaks) + time_up_stages(device, quick, peaks)


# (name, channels, downsampling stride, input length at 24 kHz x 10 s): the encoder's levels whose block
# and downsampling run as one kernel (`ops.residual_block_down`).
STAGE_LAYERS = [("enc stage 0", 32, 2, 240000), ("enc stage 1", 64, 4, 120000)]


def stage_bytes(C: int, stride: int, L: int, batch: int, size: int) -> tp.Dict[str, float]:
    """Activation bytes of a residual block (`block_bytes`) and the downsampling after it (C -> 2C,
    kernel 2 x stride): torch adds an ELU (read and write C), a padded copy (read and write C) and the
    convolution (read C, write 2C / stride per input position); ours apart: the fused block (2C) then
    the convolution with ELU and padding fused (C + 2C / stride); fused: x read once (C) and the
    downsampled output written (2C / stride)."""
    block, down = block_bytes(C, L, batch, size), size * batch * L * 2 * C / stride
    return {"torch": block["torch"] + size * batch * L * 5 * C + down,
            "unfused": block["fused"] + size * batch * L * C + down, "fused": size * batch * L * C + down}


def time_block_stages(device: str, quick: bool, peaks: tp.Optional[dict]) -> list:
    """The encoder's first levels (residual block, ELU, downsampling convolution) at batch 64 x 10 s
    in each precision mode: torch's ops (cuDNN) against our fused block and gemm convolution apart
    (`gemm`) and both in one kernel (`fused`, the block's rows recomputed for each of the
    downsampling's two overlapping taps), with the bytes each moves."""
    from encodec_fast.ops import conv
    rows = []
    batch = SIZES["rvq"][0]
    for name, C, stride, L in STAGE_LAYERS:
        if not SIZES["big_checks"]:
            C, L = max(4, C // 8), 40
        H, K = C // 2, 2 * stride
        pads = (K - stride, -(-L // stride) * stride - L)  # causal, upstream's extra padding on the right
        for mode in CONV_MODES:
            dtype = mode_dtype(mode)
            g = torch.Generator(device=device).manual_seed(C + stride)
            x = torch.randn(batch, C, L, device=device, generator=g).to(dtype)
            w1, w2, ws = _block_case_weights(C, dtype, g, device)
            wd = (torch.randn(2 * C, C, K, device=device, generator=g) / (K * C) ** 0.5).to(dtype)
            b1, b2, bs, bd = (torch.zeros(n, device=device, dtype=dtype) for n in (H, C, C, 2 * C))
            args = (x, w1, b1, w2, b2, 1, (2, 0), "reflect", ws, bs, wd, bd, stride, pads, "reflect")

            def unfused():
                y = conv.residual_block(*args[:10])
                return conv.conv1d(y, wd, bd, stride, 1, pads, "reflect", elu=True)

            def fused():
                return conv.residual_block_down(*args)

            def reference():
                return conv.residual_block_down_torch(*args)
            block_flops = 2.0 * batch * L * (3 * C * H + H * C + C * C)
            down_flops = 2.0 * batch * (L // stride) * K * C * 2 * C
            traffic = stage_bytes(C, stride, L, batch, torch.empty(0, dtype=dtype).element_size())
            with torch.no_grad(), precision_modes.scope(mode, device):
                # the fused kernel computes each block row twice (the downsampling's taps overlap)
                rows += _family_rows(f"block+down: {name}", mode, dtype, [batch, C, L], reference,
                                     [("gemm", "gemm", unfused, block_flops + down_flops, traffic["unfused"]),
                                      ("fused", "gemm", fused, 2 * block_flops + down_flops, traffic["fused"])],
                                     traffic["torch"], quick, peaks)
    return rows


# (name, block channels, upsampling stride, output length at 24 kHz x 10 s): the decoder's levels whose
# upsampling and block run as one kernel (`ops.up_residual_block`).
UP_STAGE_LAYERS = [("dec stage 2", 64, 4, 120000), ("dec stage 3", 32, 2, 240000)]


def up_stage_bytes(C: int, stride: int, L: int, batch: int, size: int) -> tp.Dict[str, float]:
    """Activation bytes of the decoder's ELU -> transposed convolution (2C -> C, kernel 2 x stride) ->
    trim -> residual block, per output position: torch's ELU (read and write 2C / stride), the
    convolution (read 2C / stride, write C before the trim, read and write C to trim) and the block
    (`block_bytes`); ours apart: the convolution with ELU and trim fused (2C / stride + C) then the
    fused block (2C); fused: 2C / stride read, C written."""
    x_in = size * batch * L * 2 * C / stride
    block = block_bytes(C, L, batch, size)
    return {"torch": 3 * x_in + size * batch * L * 3 * C + block["torch"],
            "unfused": x_in + size * batch * L * C + block["fused"], "fused": x_in + size * batch * L * C}


def time_up_stages(device: str, quick: bool, peaks: tp.Optional[dict]) -> list:
    """The decoder's last levels (ELU, transposed convolution, trim, residual block) at batch 64 x
    10 s in each precision mode: torch's ops (cuDNN) against our transposed convolution and fused
    block apart (`gemm`) and both in one kernel (`fused`, the upsampled rows recomputed for each of
    the block's three taps), with the bytes each moves."""
    from encodec_fast.ops import conv
    rows = []
    batch = SIZES["rvq"][0]
    for name, C, stride, L in UP_STAGE_LAYERS:
        if not SIZES["big_checks"]:
            C, L = max(4, C // 8), 40
        H, K, L_in = C // 2, 2 * stride, L // stride
        for mode in CONV_MODES:
            dtype = mode_dtype(mode)
            g = torch.Generator(device=device).manual_seed(C + stride)
            x = torch.randn(batch, 2 * C, L_in, device=device, generator=g).to(dtype)
            wu = (torch.randn(2 * C, C, K, device=device, generator=g) / (4 * C) ** 0.5).to(dtype)
            w1, w2, ws = _block_case_weights(C, dtype, g, device)
            bu, b1, b2, bs = (torch.zeros(n, device=device, dtype=dtype) for n in (C, H, C, C))
            # causal: the whole trim on the right
            args = (x, wu, bu, stride, 0, L_in * stride, True, w1, b1, w2, b2, 1, (2, 0), "reflect", ws, bs)

            def unfused():
                y = conv.conv_transpose1d(*args[:7])
                return conv.residual_block(y, *args[7:])

            def fused():
                return conv.up_residual_block(*args)

            def reference():
                return conv.up_residual_block_torch(*args)
            block_flops = 2.0 * batch * L * (3 * C * H + H * C + C * C)
            up_flops = 2.0 * batch * L * 2 * (2 * C) * C  # two taps per output position
            traffic = up_stage_bytes(C, stride, L, batch, torch.empty(0, dtype=dtype).element_size())
            with torch.no_grad(), precision_modes.scope(mode, device):
                # the fused kernel computes each upsampled row once per tap of the block (3)
                rows += _family_rows(f"up+block: {name}", mode, dtype, [batch, 2 * C, L_in], reference,
                                     [("gemm", "gemm", unfused, block_flops + up_flops, traffic["unfused"]),
                                      ("fused", "gemm", fused, block_flops + 3 * up_flops, traffic["fused"])],
                                     traffic["torch"], quick, peaks)
    return rows


def time_stft(device: str, quick: bool) -> list:
    """The MS-STFT discriminator's spectrogram front end (forward + backward), torch vs the Triton
    layout kernel, and the whole discriminator (forward + backward, the input's gradient included)
    in each precision mode: torch (cuDNN) against each kernel family, at a training batch."""
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
        err = float((got - ref).detach().abs().max() / ref.detach().abs().max())
        entry = {"op": f"spectrogram n_fft={n_fft} fwd+bwd", "torch_ms": bench_ms(lambda: step("torch"), quick),
                 "rel_err": err}
        entry["triton_ms"], entry["launches"] = bench_ms_launches(lambda: step("triton"), quick)
        entry["speedup"] = entry["torch_ms"] / entry["triton_ms"]
        rows.append(entry)
    torch.manual_seed(0)
    filters = 32 if SIZES["big_checks"] else 8
    disc = MultiScaleSTFTDiscriminator(filters=filters).to(device)

    def disc_step(backend):
        xin = x.clone().requires_grad_(True)  # the generator's side: the input's gradient too
        with ops.use_backend(backend):
            logits, fmaps = disc(xin)
        (sum(lg.mean() for lg in logits) + sum(f.mean() for fm in fmaps for f in fm)).backward()
    for mode in TRAIN_MODES:
        with precision_modes.scope(mode, device):
            torch_ms = bench_ms(lambda: disc_step("torch"), quick)
            for family, what in (("direct", "spectrogram kernel + fused Conv2d, torch's backward"),
                                 ("gemm", "fused front end + implicit-GEMM Conv2d both ways")):
                with EnvSetting("ENCODEC_FAST_CONV_KERNEL", family):
                    entry = {"op": f"MS-STFT discriminator fwd+bwd (filters={filters}; triton: {what})",
                             "precision": mode, "family": family, "torch_ms": torch_ms,
                             "triton_ms": bench_ms(lambda: disc_step("triton"), quick), "rel_err": None}
                entry["speedup"] = entry["torch_ms"] / entry["triton_ms"]
                rows.append(entry)
    return rows


def time_conv2d(device: str, quick: bool, peaks: tp.Optional[dict]) -> list:
    """The discriminator's Conv2d + LeakyReLU layers (n_fft=1024 scale, filters=32, a training
    batch), like for like in each precision mode (exact, tf32, bf16): cuDNN conv + LeakyReLU
    (torch's autograd backward) against each kernel family, forward alone and forward + backward
    (`direct`: the fused forward with torch's backward; `gemm`: implicit GEMM both ways, input,
    weight and bias gradients included). The shapes are read off the module."""
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
        for mode in TRAIN_MODES:
            dtype = mode_dtype(mode)
            xd, wd, bd = x.to(dtype), w.to(dtype), c.bias.detach().to(dtype)

            def fwd(backend):
                with torch.no_grad(), ops.use_backend(backend):
                    return conv.conv2d_leaky_relu(xd, wd, bd, *cfg)

            def fwd_bwd(backend):
                xin, win, bin_ = (t.clone().requires_grad_(True) for t in (xd, wd, bd))
                with ops.use_backend(backend):
                    y = conv.conv2d_leaky_relu(xin, win, bin_, *cfg)
                y.backward(torch.ones_like(y))
            with precision_modes.scope(mode, device):
                ref = fwd("torch")
                torch_fwd = bench_ms(lambda: fwd("torch"), quick)
                torch_fwd_bwd = bench_ms(lambda: fwd_bwd("torch"), quick)
                for family in ("direct", "gemm"):
                    with EnvSetting("ENCODEC_FAST_CONV_KERNEL", family):
                        got = fwd("triton")
                        err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
                        flops = 2.0 * B * ref.shape[2] * ref.shape[3] * C_in * ref.shape[1] * c.kernel_size[0] * \
                            c.kernel_size[1]
                        entry = {"op": f"conv2d{'+lrelu' if slope else ''} #{i}",
                                 "dtype": str(dtype).replace("torch.", ""), "precision": mode, "family": family,
                                 "shape": [B, C_in, H, W], "out_channels": ref.shape[1], "kernel": list(c.kernel_size),
                                 "stride": list(c.stride), "dilation": list(c.dilation), "rel_err": err,
                                 "torch_fwd_ms": torch_fwd, "torch_fwd_bwd_ms": torch_fwd_bwd,
                                 "triton_fwd_bwd_ms": bench_ms(lambda: fwd_bwd("triton"), quick)}
                        entry["triton_fwd_ms"], entry["launches"] = bench_ms_launches(lambda: fwd("triton"), quick)
                    entry["fwd_speedup"] = entry["torch_fwd_ms"] / entry["triton_fwd_ms"]
                    entry["fwd_bwd_speedup"] = entry["torch_fwd_bwd_ms"] / entry["triton_fwd_bwd_ms"]
                    entry["triton_fwd_tflops"] = flops / entry["triton_fwd_ms"] / 1e9
                    peak = None if peaks is None else peaks[MODE_PEAK[mode]]
                    entry["roofline_fraction"] = None if peak is None else entry["triton_fwd_tflops"] / peak
                    nbytes = torch.empty(0, dtype=dtype).element_size() * (x.numel() + ref.numel())
                    entry.update(roofline_ms(flops, nbytes, mode))
                    rows.append(entry)
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
    return rows


def time_model(device: str, quick: bool) -> list:
    model = peers.ours_model("24khz", peers.random_state("24khz")).to(device)
    batch, duration = SIZES["model"]
    x = voice_batch(24000, duration, 1, batch=batch).to(device)
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
    return rows


def time_train_step(device: str, quick: bool) -> list:
    """The whole training step of the 24 kHz model (the `train_step` benchmark's measure) in exact
    fp32 and bf16: ours and the torch path, and the step built from upstream's modules when upstream
    is installed."""
    from bench.benchmarks import train_step
    only = ["ours exact", "torch exact", "ours bf16", "torch bf16"]
    return train_step.measure("24khz", [1 if SMOKE else 2 if quick else 16], 0.5 if SMOKE else 1.0,
                              1 if quick else 5, [6.0] if SMOKE else [6.0, 24.0], device,
                              with_upstream=upstream_missing() is None, only=only)


STAGES = ("rvq", "conv", "block", "stft", "conv2d", "training", "train_step", "model")
#: The row fields that name a case (the rest are measurements).
PARAMS = ("op", "kbps", "stages", "frames", "precision", "dtype", "shape", "out_channels", "kernel", "stride",
          "dilation", "family")
EXTRAS = ("speedup", "tflops", "gbs", "roofline_fraction", "rel_err", "frames_equal", "ties", "non_ties", "launches",
          "predicted_ms_h100", "predicted_ms_h200", "bytes", "torch_bytes")


def selected_stages() -> tp.List[str]:
    """STAGES, or the ones $BENCH_KERNEL_STAGES names (space-separated, run in that order: a GPU lease
    runs the stages it needs most first)."""
    named = os.environ.get("BENCH_KERNEL_STAGES", "").split()
    unknown = [s for s in named if s not in STAGES]
    if unknown:
        raise ValueError(f"BENCH_KERNEL_STAGES: unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    return named or list(STAGES)


def _record_rows(ctx: Context, stage: str, rows: tp.List[tp.Dict[str, tp.Any]], configs: str) -> None:
    """Records of one stage's rows: a time (or throughput) record per implementation, the row's other
    measures as extras."""
    gpu_name = torch.cuda.get_device_name() if ctx.device == "cuda" else ""
    for row in rows:
        params = {k: "x".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items() if k in PARAMS}
        params.update(stage=stage, configs=configs, device=ctx.device)
        extra = {k: row[k] for k in EXTRAS if k in row}
        floor = predicted_ms(row.get("launches") or [], gpu_name)
        # the Triton launches' own roofline on this GPU, next to the measured Triton time
        ours = dict(extra, **({"launch_floor_ms": floor} if floor is not None else {}))
        if stage == "conv2d":
            for impl in ("torch", "triton"):
                for kind in ("fwd", "fwd_bwd"):
                    ctx.record({**params, "pass": kind.replace("_", "+")}, impl, "time", "ms",
                               [row[f"{impl}_{kind}_ms"]], note="do_bench median",
                               **(ours if impl == "triton" and kind == "fwd" else extra))
        elif stage == "training":
            for impl, key in (("torch", "ours_torch_ms"), ("triton", "ours_triton_ms"), ("upstream", "upstream_ms")):
                if row.get(key) is not None:
                    ctx.record(params, impl, "time", "ms", [row[key]], note="do_bench median",
                               **(ours if impl == "triton" else extra))
        elif stage == "train_step":
            ctx.record(params, row["implementation"], "time", "ms", row["times_ms"], parts_ms=row["parts_ms"])
        elif stage == "model":
            for label in ("torch_fp32", "triton_fp32", "triton_bf16"):
                impl, precision = label.split("_")
                for op in ("encode", "decode"):
                    ctx.record({**params, "case": row["op"], "op": op, "precision": precision}, impl, "throughput",
                               "audio s / s",
                               [row[f"{label}_{op}_audio_s_per_s"]], higher_is_better=True,
                               codes_equal_to_fp32=row[f"{label}_codes_equal_to_fp32"],
                               launches=row.get(f"launches_{op}", []) if impl == "triton" else [],
                               launch_floor_ms=(predicted_ms(row.get(f"launches_{op}", []), gpu_name)
                                                if impl == "triton" else None))
        else:
            for impl in ("torch", "triton"):
                ctx.record(params, impl, "time", "ms", [row[f"{impl}_ms"]], note="do_bench median",
                           **(ours if impl == "triton" else extra))


@benchmark("kernels", "Triton kernels vs their PyTorch paths (exact fp32 and bf16), roofline fraction, launches",
           priority=20, devices=("cuda",))
def run(ctx: Context) -> None:
    interpreted = ctx.device == "cpu"  # only reached in Triton's interpreter (a test's plumbing check)
    use_interpreter(interpreted)
    configs = "autotune" if os.environ.get("ENCODEC_FAST_AUTOTUNE") == "1" else "default"
    quick = ctx.suite != "full"
    LaunchLog.install()
    peaks = None if interpreted else peaks_for(torch.cuda.get_device_name())
    stages = {"rvq": lambda: time_rvq(ctx.device, quick, peaks), "conv": lambda: time_convs(ctx.device, quick, peaks),
              "block": lambda: time_blocks(ctx.device, quick, peaks),
              "stft": lambda: time_stft(ctx.device, quick), "conv2d": lambda: time_conv2d(ctx.device, quick, peaks),
              "training": lambda: time_training(ctx.device, quick),
              "train_step": lambda: time_train_step(ctx.device, quick),
              "model": lambda: time_model(ctx.device, quick)}
    try:
        with precision_modes.torch_precision("exact"):  # the exact fp32 reference: TF32 off everywhere
            for stage in selected_stages():
                ctx.check_time(f"stage {stage}")
                _record_rows(ctx, stage, stages[stage](), configs)
    finally:
        use_interpreter(False)
