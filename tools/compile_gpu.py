#!/usr/bin/env python
"""Ahead-of-time compile check of every Triton launch our models make, for real GPUs, on a
machine without one.

    python -m tools.compile_gpu [--archs 80,90] [--listed-archs 90|none] [--set default|full]
                                [--budget BYTES] [--only REGEX] [--jobs N] [--list] [--roofline] [--out DIR]

1. Capture. The models and ops run on `meta` tensors (shapes, no data, no memory) with the Triton
   path forced (`ops.backend.kernels_on_any_device`) under a stand-in driver that reports each
   architecture in turn (the wrappers' configuration tables depend on it); Triton's
   `jit_cache_hook` records each launch (signature, constexprs, specialization, num_warps,
   num_stages) and answers "skip", so nothing is compiled or run at that point. A second pass
   with ENCODEC_FAST_AUTOTUNE=1 records every configuration the autotuning lists would time
   (after their pruning). Launches that differ only in sizes share one entry, with every
   scenario that made it as its labels.
2. Compile. Each launch, for each architecture that makes it, through `triton.compile(ASTSource(
   ...), target=GPUTarget("cuda", arch, 32))`: the ptxas of the triton wheel, no driver.
   Registers, spills and stack come from ptxas' verbose log, shared memory from the compiled
   metadata. The lists' configurations compile for --listed-archs (default: every architecture).
3. Judge. Exit status 1 on a compile failure, shared memory over the architecture's limit, or a
   default launch with more than --budget bytes of spill stores (default 512; loads and the stack
   frame are reported). Why stores and 512: on an H200 the fastest exact-fp32 RVQ configuration
   keeps 440 B of spill stores (256 B of local memory) and runs 1.8x faster than the best one
   without any, while the configurations that ran 10-30x slower spilled 5-20 KB
   (bench/results/gpu_h200_2026-11-30/gpu_sweep_2026-11-30.md). `--set default` (what CI runs) is the default
   precision (exact fp32) and the half dtypes; `--set full` adds the tf32x3 and tf32 modes of
   every kernel, reported but not judged for spills (not the default precision).

Results are cached per (triton version, architecture, kernel source, launch) in
$ENCODEC_FAST_COMPILE_CACHE (default ~/.cache/encodec_fast/compile_gpu), so a rerun after a change
compiles only what changed.
"""

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_gpu.py compiles real GPU code: unset TRITON_INTERPRET")

# Registers per SM and the most resident warps per SM (both 64K / 64 on sm_80, sm_90, sm_100), and
# the opt-in shared memory per block: A100 (sm_80) 163 KiB, H100/H200 (sm_90) and B200 (sm_100) 227 KiB.
SM_REGISTERS, SM_WARPS = 65536, 64
SHARED_LIMIT = {80: 166912, 90: 232448, 100: 232448}
SPILL_BUDGET = 512

CACHE = Path(os.environ.get("ENCODEC_FAST_COMPILE_CACHE", Path.home() / ".cache" / "encodec_fast" / "compile_gpu"))


# -- capture -----------------------------------------------------------------------------------------

class Launch(tp.NamedTuple):
    """One distinct launch configuration of a kernel."""
    module: str
    kernel: str
    signature: tp.Dict[str, str]
    constexprs: tp.Dict[tp.Tuple[int, ...], tp.Any]
    attrs: tp.Dict[tp.Tuple[int, ...], tp.Any]
    options: tp.Dict[str, int]          # num_warps, num_stages, enable_fp_fusion
    constexpr_names: tp.Tuple[str, ...]
    labels: tp.List[str]
    roles: tp.Dict[int, str]            # per architecture: "judged" (a default launch, counted against
                                        # the spill budget), "default" (a default launch in a precision
                                        # mode that is not the default) or "listed" (an autotuning list's)
    # per scenario label (the default launches only): the calls it made of this configuration and
    # their work and roofline, added up (bench/launch_roofline.py); None where nothing was recorded
    work: tp.Optional[tp.Dict[str, tp.Dict[str, tp.Any]]] = None

    def constexpr_text(self) -> str:
        names = list(self.signature)
        short = {"BLOCK_CO": "CO", "BLOCK_CI": "CI", "BLOCK_T": "T", "BLOCK_J": "J", "BLOCK_P": "P", "BLOCK_N": "N",
                 "BLOCK_K": "BK", "BLOCK_KR": "KR", "BLOCK_D": "BD", "PRECISION": "", "HAS_BIAS": "bias",
                 "HAS_RES": "res", "HALF_DOT": "half", "REFLECT": "reflect", "ACTIVATE": "act", "STATS": "stats",
                 "ELU": "elu", "CERTIFY": "certified", "PERTURB": "perturb"}
        parts = []
        for name in self.constexpr_names:
            value = self.constexprs.get((names.index(name),))
            label = short.get(name, name)
            if isinstance(value, bool):
                if value:
                    parts.append(label)
            elif label:
                parts.append(f"{label}{value}")
            else:
                parts.append(str(value))
        # pointer types in the order of first appearance (the first argument's first: the input's)
        ptr_types = dict.fromkeys(t[1:] for t in self.signature.values() if t.startswith("*") and t != "*i64")
        return " ".join(parts + ["/".join(ptr_types)] + [f"w{self.options['num_warps']}",
                                                           f"s{self.options['num_stages']}"])


_ROLE_RANK = {"listed": 0, "default": 1, "judged": 2}


def listed_only(launch: Launch, arch: tp.Optional[int] = None) -> bool:
    """Made only by an autotuning list (on `arch`, or on every architecture)."""
    if arch is not None:
        return launch.roles.get(arch) == "listed"
    return all(role == "listed" for role in launch.roles.values())


def variant(launch: Launch, **changes) -> Launch:
    """The same launch with other constexprs (by name) or options (num_warps, num_stages)."""
    names = list(launch.signature)
    constexprs, options = dict(launch.constexprs), dict(launch.options)
    for name, value in changes.items():
        if name in options:
            options[name] = value
        else:
            constexprs[(names.index(name),)] = value
    return launch._replace(constexprs=constexprs, options=options)


class _Recorder:
    def __init__(self):
        self.launches: tp.Dict[tp.Any, Launch] = {}
        self.scenario = ""
        self.suffix = ""
        self.judged = True
        self.arch = 90
        self.pending = None  # the launch about to reach the hook (bench.launch_roofline.Call)
        self.roofline_arch = 90  # whose launches the roofline adds up: H100 and H200 are sm_90

    def called(self, call) -> None:
        self.pending = call

    def _add_work(self, launch: Launch, label: str, kernel: str) -> None:
        """Adds the pending launch's work to `label`'s: the default launches on `roofline_arch` only
        (each architecture runs every scenario, some with configurations of its own)."""
        from bench.launch_roofline import accumulate
        call, self.pending = self.pending, None
        if self.suffix or self.arch != self.roofline_arch or call is None or call.kernel != kernel:
            return
        work = call.work()
        if work is not None:
            accumulate(launch.work.setdefault(label, {"peak": work.peak, "passes": work.passes}), work)

    def hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
        jit = fn.jit_function
        signature = dict(compile["signature"])
        constexprs = dict(compile["constants"])
        names = tuple(p.name for p in jit.params if p.is_constexpr)
        options = {"num_warps": compile["num_warps"], "num_stages": compile["num_stages"],
                   "enable_fp_fusion": compile["enable_fp_fusion"]}
        # Launches that differ in sizes only (hence in integer specializations) compile alike: one entry.
        ident = (jit.fn.__module__, jit.fn.__name__, tuple(sorted(signature.items())),
                 tuple(sorted((k, str(v)) for k, v in constexprs.items())), tuple(sorted(options.items())))
        launch = self.launches.get(ident)
        if launch is None:
            launch = self.launches[ident] = Launch(jit.fn.__module__, jit.fn.__name__, signature, constexprs,
                                                   dict(compile["configs"][0]), options, names, [], {}, {})
        role = "listed" if self.suffix else "judged" if self.judged else "default"
        if _ROLE_RANK[role] > _ROLE_RANK.get(launch.roles.get(self.arch, ""), -1):
            launch.roles[self.arch] = role
        label = self.scenario + self.suffix
        if label not in launch.labels:
            launch.labels.append(label)
        self._add_work(launch, label, jit.fn.__name__)
        return True  # skip compiling and launching


def stand_in_driver_class(arch: tp.Callable[[], int]):
    """A Triton driver class for a CUDA device of architecture `arch()` that is not there: the JIT
    binds and specializes arguments for it (on `meta` tensors) and nothing can launch."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandIn(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", arch(), 32)

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_benchmarker(self):
            raise RuntimeError("no benchmarking without a GPU")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    return StandIn


@contextlib.contextmanager
def _stand_in_driver(recorder: _Recorder):
    """A driver that reports a CUDA device (so the JIT binds and specializes arguments) and a cache
    hook that records each launch and skips it."""
    from triton import knobs
    from triton.runtime.driver import driver

    StandIn = stand_in_driver_class(lambda: recorder.arch)
    previous_hook = knobs.runtime.jit_cache_hook
    driver.set_active(StandIn())
    knobs.runtime.jit_cache_hook = recorder.hook
    try:
        yield
    finally:
        knobs.runtime.jit_cache_hook = previous_hook
        try:
            driver.reset_active()
        except RuntimeError:  # no real driver on this machine: leave none active
            driver.set_active(None)


@contextlib.contextmanager
def _scenario(recorder: _Recorder, label: str, judged: bool = True):
    recorder.scenario, recorder.judged = label, judged
    try:
        yield
    finally:
        recorder.scenario, recorder.judged = "", True


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _patched(owner, name: str, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


@contextlib.contextmanager
def on_meta():
    """What the scenarios run under: our Triton kernels on any device (meta tensors here), no
    autograd, and the LSTM giving its output's shape only (it launches no kernel of ours, and torch
    runs it on meta tensors one time step at a time in Python: minutes for these scenarios)."""
    import torch

    from encodec_fast.modules.lstm import SLSTM
    from encodec_fast.ops import backend

    def lstm_shape_only(self, x, elu, state=None):
        return torch.empty_like(x), state

    with backend.kernels_on_any_device(), backend.use_backend("triton"), torch.no_grad(), \
            _patched(SLSTM, "run", lstm_shape_only):
        yield


def roofline_arch(archs: tp.Sequence[int]) -> int:
    """The architecture whose launches the roofline adds up: sm_90 (H100's and H200's) where captured."""
    return 90 if 90 in archs else archs[0]


def capture(full: bool, archs: tp.Sequence[int] = (90,), recorder: tp.Optional["_Recorder"] = None
            ) -> tp.List[Launch]:
    """Run every scenario on meta tensors, once per architecture (the wrappers' tables depend on
    it); returns the distinct launches in the order first seen, each with the architectures that
    launch it (`recorder`: one that records more, tools/triton_cache.py's)."""
    recorder = recorder or _Recorder()
    recorder.roofline_arch = roofline_arch(archs)
    precisions = ("ieee", "tf32x3", "tf32") if full else ("ieee",)

    def every_listed_config(self, *args, **kwargs):
        # With autotuning on, a launch goes through triton's Autotuner: record every configuration
        # it would time (after its pruning), not only the default.
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    from triton.runtime.autotuner import Autotuner

    from bench.launch_roofline import recording
    with _stand_in_driver(recorder), on_meta(), _patched(Autotuner, "run", every_listed_config), \
            recording(recorder.called):
        from encodec_fast.kernels import tuning
        for arch in archs:
            recorder.arch = arch
            tuning._ARCHS.clear()  # the wrappers ask the (stand-in) driver again
            for tuned in (False, True):
                recorder.suffix = " [autotune list]" if tuned else ""
                with _env("ENCODEC_FAST_AUTOTUNE", "1" if tuned else "0"):
                    _scenarios(recorder, precisions)
        tuning._ARCHS.clear()
    return list(recorder.launches.values())


def _blocks_alone(model, dtype, device) -> None:
    """`ops.residual_block` on the 24 kHz encoder's blocks of 32 and 64 channels (10 s x 64)."""
    import torch

    from encodec_fast import ops
    from encodec_fast.modules.seanet import SEANetResnetBlock
    L = model.sample_rate * 10
    for block in [m for m in model.encoder.modules() if isinstance(m, SEANetResnetBlock)][:2]:
        convs = block.convs()
        C = convs[0].conv.conv.in_channels
        x = torch.empty(64, C, L, device=device, dtype=dtype)
        ops.residual_block(x, *block._fused_args(L, convs))
        L //= 2


def _scenarios(recorder: "_Recorder", precisions: tp.Sequence[str]) -> None:
    """Every launch of both models, the RVQ kernels and the discriminator, on meta tensors."""
    import torch
    from encodec_fast.kernels import rvq as krvq

    from encodec_fast.model import EncodecModel
    from encodec_fast.train.msstftd import MultiScaleSTFTDiscriminator
    meta = torch.device("meta")
    # SEANet encoder and decoder of both models: 1 s and 10 s, batch 1 and 64.
    for name, factory in (("24k", EncodecModel.encodec_model_24khz), ("48k", EncodecModel.encodec_model_48khz)):
        model = factory(pretrained=False).eval()
        model.encoder.to(meta)
        model.decoder.to(meta)
        sr, ch, dim = model.sample_rate, model.channels, model.quantizer.dimension
        for precision in precisions:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                if dtype != torch.float32 and precision != "ieee":
                    continue  # half dtypes multiply in their own dtype: no precision mode
                tag = "fp32" if dtype == torch.float32 else str(dtype).replace("torch.", "")
                judged = precision == "ieee"
                enc, dec = model.encoder.to(dtype), model.decoder.to(dtype)
                with _env("ENCODEC_FAST_CONV_PRECISION", precision):
                    # Also a batch of 8 and a length that is no multiple of 16 (Triton specializes
                    # integers on that): the sizes the benchmarks and tools/triton_cache.py meet.
                    for samples, batch in ((sr, 1), (sr, 64), (10 * sr, 1), (10 * sr, 64), (sr, 8), (sr + 7, 3)):
                        length = f"{samples // sr}s" + (f"+{samples % sr}" if samples % sr else "")
                        with _scenario(recorder, f"{name} encoder {length} x{batch} {tag} {precision}", judged):
                            enc(torch.empty(batch, ch, samples, device=meta, dtype=dtype))
                        frames = -(-samples // model.encoder.hop_length)
                        with _scenario(recorder, f"{name} decoder {length} x{batch} {tag} {precision}", judged):
                            dec(torch.empty(batch, dim, frames, device=meta, dtype=dtype))
        # The implicit-GEMM kernels (ENCODEC_FAST_CONV_KERNEL=gemm) in the modes they are built for,
        # tensor cores: tf32, bf16 and fp16 are judged (tensor-core instructions required, spills
        # against the budget); exact fp32 on CUDA cores (it spills) is reported with --set full.
        gemm_modes = [(torch.float32, "tf32"), (torch.bfloat16, "ieee"), (torch.float16, "ieee")]
        with _env("ENCODEC_FAST_CONV_KERNEL", "gemm"):
            for dtype, precision in gemm_modes + ([(torch.float32, "ieee")] if len(precisions) > 1 else []):
                tag = ("fp32" if dtype == torch.float32 else str(dtype).replace("torch.", "")) + " gemm"
                judged = not (dtype == torch.float32 and precision == "ieee")
                enc, dec = model.encoder.to(dtype), model.decoder.to(dtype)
                with _env("ENCODEC_FAST_CONV_PRECISION", precision):
                    for samples, batch in ((sr, 1), (10 * sr, 64), (sr + 7, 3)):
                        length = f"{samples // sr}s" + (f"+{samples % sr}" if samples % sr else "")
                        with _scenario(recorder, f"{name} encoder {length} x{batch} {tag} {precision}", judged):
                            enc(torch.empty(batch, ch, samples, device=meta, dtype=dtype))
                        frames = -(-samples // model.encoder.hop_length)
                        with _scenario(recorder, f"{name} decoder {length} x{batch} {tag} {precision}", judged):
                            dec(torch.empty(batch, dim, frames, device=meta, dtype=dtype))
                    if name == "24k":
                        # A residual block alone (its level's resampling not fused: several blocks
                        # in a row, or a resampling the fused levels do not take), 32 and 64 channels.
                        with _scenario(recorder, f"{name} residual blocks alone 10s x64 {tag} {precision}", judged):
                            _blocks_alone(model, dtype, meta)
        # Clips of different lengths in one call (encode_batch on CUDA, `RaggedRows`): every
        # convolution reads a buffer padded per row, so it launches without padding of its own.
        if name == "24k":
            from encodec_fast.modules.groups import RaggedRows
            for family, dtype, precision in [("direct", torch.float32, "ieee"), ("direct", torch.bfloat16, "ieee"),
                                             ("gemm", torch.float32, "tf32"), ("gemm", torch.bfloat16, "ieee"),
                                             ("direct", torch.float16, "ieee"), ("gemm", torch.float16, "ieee")]:
                tag = ("fp32" if dtype == torch.float32 else str(dtype).replace("torch.", "")) + f" {family}"
                enc = model.encoder.to(dtype)
                with _env("ENCODEC_FAST_CONV_KERNEL", family), _env("ENCODEC_FAST_CONV_PRECISION", precision), \
                        _scenario(recorder, f"{name} encoder ragged 10s x64 {tag} {precision}"):
                    enc(torch.empty(64, ch, sr * 10, device=meta, dtype=dtype),
                        RaggedRows(torch.empty(64, dtype=torch.long, device=meta)))

    # RVQ: 1024-entry codebooks of dimension 128, n_q 1..32, one frame and 64 x 10 s of frames.
    D, K = 128, 1024
    codebooks = torch.empty(32, K, D, device=meta)
    norms = torch.empty(32, K, device=meta)
    # The search: 'exact' (certified, the default, on tensor cores in each low precision it can
    # use) and 'ieee' (its fp32 fallback, a user's choice too) are judged; tf32x3 and tf32 are not.
    from encodec_fast.ops.rvq import LOW_PRECISION, certify_with
    searches = [("exact", certify_with())] + [(precision, "") for precision in precisions]
    if len(precisions) > 1:  # --set full: the other low precisions under the certificate
        searches += [("exact", lowp) for lowp in LOW_PRECISION if lowp != certify_with()]
    for precision, lowp in searches:
        judged = precision == "ieee" or (precision == "exact" and lowp == certify_with())
        name = f"exact/{lowp}" if lowp else precision
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            tag = str(dtype).replace("torch.", "")
            for N in (1, 750 * 64):
                x = torch.empty(1, D, N, device=meta, dtype=dtype)
                for n_q in (1, 2, 4, 8, 16, 32):
                    with _scenario(recorder, f"rvq encode N={N} n_q={n_q} {tag} {name}", judged):
                        krvq.rvq_encode(x, codebooks, norms, n_q, precision, lowp or "bf16x3")
                if precision == "exact":
                    continue  # the training stage has no certified search
                rows = torch.empty(N, D, device=meta, dtype=dtype)  # the quantizer's flattened [B*T, D], contiguous
                for stats in (False, True):
                    with _scenario(recorder, f"rvq train stage N={N} stats={stats} {tag} {precision}", judged):
                        krvq.vq_assign(rows, codebooks[0], norms[0], stats, precision)
    # The training forward of every stage (the certified search) and its backward: a training batch
    # of 8 x 1 s, 64 x 1 s and 64 x 10 s of 24 kHz frames.
    for N in (75 * 8, 75 * 64, 750 * 64):
        x = torch.empty(1, D, N, device=meta)
        for detach in (False, True):
            with _scenario(recorder, f"rvq train all stages N={N} n_q=32 detach={detach} exact/{certify_with()}"):
                krvq.rvq_train_forward(x, codebooks, norms, 32, detach, "exact", certify_with())
        with _scenario(recorder, f"rvq train backward N={N} n_q=32"):
            krvq.rvq_train_backward(x, codebooks, torch.empty(32, N, dtype=torch.int64, device=meta),
                                    torch.empty(32, N, D, device=meta), torch.empty(32, device=meta), 32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for N in (1, 750 * 64):
            codes = torch.empty(32, N, dtype=torch.int64, device=meta)
            with _scenario(recorder, f"rvq decode N={N} n_q=32 {str(dtype).replace('torch.', '')}"):
                krvq.rvq_decode(codes, codebooks, 1, N, dtype)

    # MS-STFT discriminator (filters 32, the three scales): Conv2d + LeakyReLU forward, and the
    # spectrogram layout kernel forward and backward.
    disc = MultiScaleSTFTDiscriminator(filters=32).to(meta)
    for precision in precisions:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            if dtype != torch.float32 and precision != "ieee":
                continue
            tag = "fp32" if dtype == torch.float32 else str(dtype).replace("torch.", "")
            disc.to(dtype)
            with _env("ENCODEC_FAST_CONV_PRECISION", precision):
                for d in disc.discriminators:
                    with _scenario(recorder, f"msstftd n_fft={d.n_fft} 1s x8 {tag} {precision}", precision == "ieee"):
                        frames = 1 + (24000 - d.win_length) // d.hop_length
                        z = torch.empty(8, 2, frames, d.n_fft // 2 + 1, device=meta, dtype=dtype)
                        for layer in d.convs:
                            z = layer(z, 0.2)
                        d.conv_post(z)
        # The gemm family's Conv2d + LeakyReLU, forward and backward (input, weight and bias
        # gradients: the training step's), in the modes it is built for: tensor cores, judged.
        if precision == "ieee":
            with _env("ENCODEC_FAST_CONV_KERNEL", "gemm"), torch.enable_grad():
                for dtype, dot in [(torch.float32, "tf32"), (torch.bfloat16, "ieee"), (torch.float16, "ieee")]:
                    tag = "fp32" if dtype == torch.float32 else str(dtype).replace("torch.", "")
                    disc.to(dtype)
                    with _env("ENCODEC_FAST_CONV_PRECISION", dot):
                        for d in disc.discriminators:
                            frames, bins = 1 + (24000 - d.win_length) // d.hop_length, d.n_fft // 2 + 1
                            with _scenario(recorder, f"msstftd n_fft={d.n_fft} 1s x8 {tag} gemm {dot} fwd+bwd"):
                                # the fused front end: the first conv reads torch.stft's real view
                                # ([B, frames, bins, 2] in memory) with the normalisation folded in
                                z = torch.empty(8, frames, bins, 2, device=meta, dtype=dtype, requires_grad=True)
                                y = d.convs[0](z.permute(0, 3, 1, 2), 0.2, 0.03)
                                for layer in list(d.convs)[1:]:
                                    y = layer(y, 0.2)
                                y = d.conv_post(y)
                                y.backward(torch.empty_like(y))
                            with _scenario(recorder, f"msstftd n_fft={d.n_fft} first conv frames-first {tag} gemm "
                                                     f"{dot} fwd+bwd"):
                                z = torch.empty(8, bins, frames, 2, device=meta, dtype=dtype, requires_grad=True)
                                y = d.convs[0](z.permute(0, 3, 2, 1), 0.2, 0.03)
                                y.backward(torch.empty_like(y))
    disc.float()
    from encodec_fast.kernels import stft as kstft
    for d in disc.discriminators:
        frames = 1 + (24000 - d.win_length) // d.hop_length
        spec = torch.empty(8, d.n_fft // 2 + 1, frames, 2, device=meta)
        with _scenario(recorder, f"spectrogram n_fft={d.n_fft} forward"):
            kstft.scaled_copy(spec.view(8, 1, d.n_fft // 2 + 1, frames, 2).permute(0, 4, 1, 3, 2), 0.1)
        with _scenario(recorder, f"spectrogram n_fft={d.n_fft} backward"):
            grad = torch.empty(8, 2, 1, frames, d.n_fft // 2 + 1, device=meta)
            kstft.scaled_copy(grad.permute(0, 2, 4, 3, 1), 0.1)


# -- compile -----------------------------------------------------------------------------------------

_PTXAS = {"regs": r"Used (\d+) registers", "stack": r"(\d+) bytes stack frame",
          "spill_st": r"(\d+) bytes spill stores", "spill_ld": r"(\d+) bytes spill loads"}


def _cache_key(launch: Launch, arch: int) -> str:
    import triton
    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    text = json.dumps(["ptx counts", triton.__version__, arch, fn.cache_key, launch.kernel,
                       sorted(launch.signature.items()),
                       sorted((str(k), str(v)) for k, v in launch.constexprs.items()),
                       sorted((str(k), str(v)) for k, v in launch.attrs.items()), sorted(launch.options.items())])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextlib.contextmanager
def _stderr_to(path: str):
    """fd 2 to a file: MLIR and LLVM write their diagnostics there from C++."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def compile_launch(launch: Launch, arch: int) -> tp.Dict[str, tp.Any]:
    """Compile one launch for sm_<arch> (in a worker process); never raises."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    knobs.nvidia.dump_ptxas_log = True
    started = time.time()
    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    out = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "stderr.log")
        # A private Triton cache: its cache would hand back a kernel without re-running ptxas.
        with _env("TRITON_CACHE_DIR", os.path.join(tmp, "triton")):
            try:
                with contextlib.redirect_stdout(out), _stderr_to(log):
                    compiled = triton.compile(ASTSource(fn, launch.signature, launch.constexprs, launch.attrs),
                                              target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
            except Exception as err:  # a compile error is a result
                diag = "\n".join(line for line in open(log).read().splitlines() if "error" in line)
                text = f"{type(err).__name__}: {str(err).strip()}".split("Repro command")[0]
                return {"ok": False, "error": (text + "\n" + diag).strip()[:3000], "secs": time.time() - started}
    result: tp.Dict[str, tp.Any] = {"ok": True, "shared": int(compiled.metadata.shared),
                                    "secs": time.time() - started}
    for name, pattern in _PTXAS.items():
        found = re.search(pattern, out.getvalue())
        result[name] = int(found.group(1)) if found else 0
    result.update(ptx_counts(compiled.asm["ptx"]))
    if not re.search(_PTXAS["regs"], out.getvalue()):
        result.update(ok=False, error="no ptxas log (is this triton's NVIDIA backend?)")
    return result


def ptx_counts(ptx: str) -> tp.Dict[str, int]:
    """Static instruction counts in a kernel's PTX: `mma` = tensor-core instructions (`mma.sync` +
    `wgmma.mma_async`), each kind too, fp32 FMAs, and vector / asynchronous global loads."""
    counts = {"mma_sync": len(re.findall(r"\bmma\.sync\.", ptx)),
              "wgmma": len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
              "fma_f32": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
              "ld_vector": len(re.findall(r"\bld\.global[.\w]*\.v[248]\.", ptx)),
              "cp_async": len(re.findall(r"\bcp\.async\.(?:cg|ca|bulk)", ptx))}
    counts["mma"] = counts["mma_sync"] + counts["wgmma"]
    return counts


def meant_for_tensor_cores(launch: Launch) -> bool:
    """A launch whose products are asked to run on tensor cores: a fp32 dot in a tensor-core
    precision (tf32, tf32x3, bf16x3, bf16x6; the certified search's), or a half-precision dot."""
    names = list(launch.signature)
    value = lambda name: launch.constexprs.get((names.index(name),)) if name in names else None  # noqa: E731
    precision = value("PRECISION")
    return (isinstance(precision, str) and precision != "ieee") or value("HALF_DOT") is True


def supported_archs() -> tp.List[int]:
    """The architectures the installed triton's ptxas accepts among 80, 90 and 100."""
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        version = str(get_ptxas(100).version or "")  # triton 3.6-3.9: the ptxas for an architecture
    except Exception:
        version = ""
    found = re.search(r"(\d+)\.(\d+)", version)
    archs = [80, 90]
    if found and (int(found.group(1)), int(found.group(2))) >= (12, 8):
        archs.append(100)
    return archs


def compile_all(launches: tp.Sequence[Launch], archs: tp.Sequence[int], jobs: int,
                progress: bool = True, listed_archs: tp.Optional[tp.Sequence[int]] = None
                ) -> tp.Dict[tp.Tuple[int, int], tp.Dict[str, tp.Any]]:
    """{(launch index, arch): result}, from the cache where it has them. Launches that only the
    autotuning lists make are compiled for `listed_archs` (default: all of `archs`)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    results, todo = {}, []
    for i, launch in enumerate(launches):
        for arch in archs:
            if arch not in launch.roles:
                continue
            if listed_archs is not None and arch not in listed_archs and listed_only(launch, arch):
                continue
            path = CACHE / f"{_cache_key(launch, arch)}.json"
            if path.exists():
                results[(i, arch)] = {**json.loads(path.read_text()), "cached": True}
            else:
                todo.append((i, arch, path))
    # The heaviest (most unrolled taps) first: fewer idle workers at the end.
    def weight(item):
        launch = launches[item[0]]
        names = list(launch.signature)
        get = lambda n: launch.constexprs.get((names.index(n),), 1) if n in names else 1  # noqa: E731
        return -get("K") * get("KH") * get("KW")
    todo.sort(key=weight)
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="compiling", unit="kernel", file=sys.stderr,
                   disable=None)  # no bar off a terminal
    with cf.ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(compile_launch, launches[i], arch): (i, arch, path) for i, arch, path in todo}
        for future in cf.as_completed(futures):
            i, arch, path = futures[future]
            try:
                result = future.result()
            except Exception as err:  # the worker died (a crash in the compiler)
                result = {"ok": False, "error": f"compiler process died: {err!r}", "secs": 0.0}
            if result["ok"]:
                path.write_text(json.dumps(result))
            results[(i, arch)] = result
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return results


# -- judge and report ----------------------------------------------------------------------------------

def occupancy(result: tp.Dict[str, tp.Any], warps: int, arch: int) -> float:
    """Resident warps per SM / the most an SM holds, bounded by registers and shared memory (blocks
    per SM also capped at 32); an estimate, as CUDA's occupancy calculator gives."""
    regs = max(result.get("regs", 0), 1)
    per_warp = -(-regs * 32 // 256) * 256  # register allocation granularity: 256 per warp
    blocks = min(SM_REGISTERS // (per_warp * warps), 32, SM_WARPS // warps)
    if result.get("shared"):
        blocks = min(blocks, SHARED_LIMIT.get(arch, SHARED_LIMIT[90]) // result["shared"])
    return blocks * warps / SM_WARPS


def verdicts(launches, results, archs, budget) -> tp.List[str]:
    """Every reason to fail the check."""
    out = []
    for i, launch in enumerate(launches):
        for arch in archs:
            r = results.get((i, arch))
            what = f"[{i}] {launch.kernel} {launch.constexpr_text()} sm_{arch}"
            if r is None:
                continue
            if not r["ok"]:
                out.append(f"{what}: compile failure: {r['error'].splitlines()[0] if r['error'] else ''}")
            elif r["shared"] > SHARED_LIMIT.get(arch, SHARED_LIMIT[90]):
                out.append(f"{what}: {r['shared']} B of shared memory > the {SHARED_LIMIT[arch]} B limit")
            elif meant_for_tensor_cores(launch) and r.get("mma", 0) == 0:
                out.append(f"{what}: meant for tensor cores, but no mma.sync / wgmma in its PTX")
            elif launch.roles.get(arch) == "judged" and r["spill_st"] > budget:
                out.append(f"{what}: {r['spill_st']} B of spill stores > budget {budget} B "
                           f"({r['spill_ld']} B of loads, {r['stack']} B stack frame)")
    return out


def worst_by_kernel(launches, results, archs) -> str:
    """Markdown: per kernel and architecture, the most spill stores (and the largest stack frame)
    of its default launches: the summary the README quotes."""
    worst: tp.Dict[str, tp.Dict[int, tp.Tuple[int, int]]] = {}
    for i, launch in enumerate(launches):
        name = launch.kernel.strip("_").replace("_kernel", "")
        for arch in archs:
            r = results.get((i, arch))
            if r is None or not r.get("ok") or launch.roles.get(arch) != "judged":
                continue
            old = worst.setdefault(name, {}).get(arch, (0, 0))
            worst[name][arch] = (max(old[0], r["spill_st"]), max(old[1], r["stack"]))
    rows = ["| kernel | " + " | ".join(f"sm_{a}: spill stores / stack B" for a in archs) + " |",
            "|---|" + "---|" * len(archs)]
    for name, per_arch in worst.items():
        rows.append(f"| {name} | " + " | ".join(
            "{} / {}".format(*per_arch[a]) if a in per_arch else "-" for a in archs) + " |")
    return "\n".join(rows)


def table(launches, results, archs) -> str:
    head = ["#", "kernel", "configuration", "used by"]
    for arch in archs:
        head += [f"sm_{arch} regs", "spill st/ld B", "stack B", "smem KiB", "occ.", "mma (wgmma)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, launch in enumerate(launches):
        used = launch.labels[0] + (f" (+{len(launch.labels) - 1})" if len(launch.labels) > 1 else "")
        cells = [str(i), launch.kernel.strip("_").replace("_kernel", ""), launch.constexpr_text(), used]
        for arch in archs:
            r = results.get((i, arch))
            if r is None or not r["ok"]:
                cells += ["FAIL" if r else "-", "", "", "", "", ""]
                continue
            mma = f"{r['mma']} ({r['wgmma']})" if "mma" in r else "?"
            cells += [str(r["regs"]), f"{r['spill_st']}/{r['spill_ld']}", str(r["stack"]),
                      f"{r['shared'] / 1024:.0f}", f"{occupancy(r, launch.options['num_warps'], arch):.0%}", mma]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def roofline_of(launch: Launch) -> tp.Dict[str, tp.Dict[str, tp.Any]]:
    """{scenario label: its calls of this launch, GFLOP, MB, products' precision, predicted ms on
    H100 and H200 (each call's roofline, added) and what bounds it}: the report's `roofline` field."""
    from bench.peaks import bound
    out = {}
    for label, w in (launch.work or {}).items():
        out[label] = {"calls": w["calls"], "gflop": w["flop"] / 1e9, "mbytes": w["bytes"] / 1e6,
                      "products": f"{w['peak']} x{w['passes']}" if w["passes"] > 1 else w["peak"],
                      "predicted_ms_h100": float(f"{w['predicted_ms_h100']:.5g}"),
                      "predicted_ms_h200": float(f"{w['predicted_ms_h200']:.5g}"),
                      "bound": bound(w["flop"], w["bytes"], w["peak"], w["passes"])}
    return out


_SCENARIO_AUDIO = re.compile(r"(?:encoder|decoder) (\d+)s(?:\+\d+)? x(\d+) ")


def roofline_tables(launches, arch: int = 90) -> str:
    """Markdown (the launches of sm_`arch`, whose work the capture added up: sm_90 is H100's and
    H200's, `capture`'s choice where it ran): the roofline of each scenario (its launches'
    floors added up; for the models, the audio seconds per second that floor allows) and of each
    launch's heaviest scenario."""
    scenarios: tp.Dict[str, tp.Dict[str, float]] = {}
    heaviest = []
    for i, launch in enumerate(launches):
        per_label = roofline_of(launch)
        for label, r in per_label.items():
            total = scenarios.setdefault(label, {"launches": 0, "calls": 0, "gflop": 0.0, "mbytes": 0.0,
                                                 "predicted_ms_h100": 0.0, "predicted_ms_h200": 0.0})
            total["launches"] += 1
            for name in ("calls", "gflop", "mbytes", "predicted_ms_h100", "predicted_ms_h200"):
                total[name] += r[name]
        if per_label:
            label, r = max(per_label.items(), key=lambda item: item[1]["predicted_ms_h100"])
            heaviest.append((i, launch, label, r))
    rows = ["| scenario | configurations | calls | GFLOP | MB | H100 ms | H200 ms | audio-s/s at the H100 floor |",
            "|---|---|---|---|---|---|---|---|"]
    for label, t in scenarios.items():
        found = _SCENARIO_AUDIO.search(label + " ")
        audio = (f"{int(found.group(1)) * int(found.group(2)) / (t['predicted_ms_h100'] / 1e3):,.0f}"
                 if found and int(found.group(1)) and t["predicted_ms_h100"] > 0 else "")
        rows.append(f"| {label} | {t['launches']} | {t['calls']} | {t['gflop']:.3g} | {t['mbytes']:.3g} | "
                    f"{t['predicted_ms_h100']:.3g} | {t['predicted_ms_h200']:.3g} | {audio} |")
    per_launch = ["| # | kernel | configuration | heaviest scenario | calls | GFLOP | MB | products | bound | "
                  "H100 ms | H200 ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, launch, label, r in heaviest:
        per_launch.append(f"| {i} | {launch.kernel.strip('_').replace('_kernel', '')} | {launch.constexpr_text()} | "
                          f"{label} | {r['calls']} | {r['gflop']:.3g} | {r['mbytes']:.3g} | {r['products']} | "
                          f"{r['bound']} | {r['predicted_ms_h100']:.3g} | {r['predicted_ms_h200']:.3g} |")
    return (f"Roofline per scenario of the sm_{arch} launches (bench/launch_roofline.py: each launch's FLOP at "
            "the dense peak of its products' precision or its compulsory bytes at HBM bandwidth, whichever is "
            "slower, added over the scenario's launches; a floor, not a forecast: the certified search's "
            "rescoring, cache misses and launch overhead are not in it; the LSTM and other torch ops are not "
            "Triton launches):\n\n" + "\n".join(rows)
            + f"\n\nRoofline per launch configuration (sm_{arch}), at its heaviest scenario:\n\n"
            + "\n".join(per_launch))


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=None, help="comma-separated, e.g. 80,90 (default: 80, 90 and 100 "
                                                      "where the installed triton supports it)")
    parser.add_argument("--set", choices=("default", "full"), default="default")
    parser.add_argument("--budget", type=int, default=SPILL_BUDGET,
                        help=f"bytes of spill stores a default launch may have (default {SPILL_BUDGET})")
    parser.add_argument("--listed-archs", default=None,
                        help="architectures for the configurations that only the autotuning lists make "
                             "(comma-separated, or 'none'; default: those of --archs)")
    parser.add_argument("--only", default=None, help="regex on kernel, configuration and labels")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--list", action="store_true", help="list the captured launches, compile nothing")
    parser.add_argument("--roofline", action="store_true",
                        help="print the captured launches' roofline per scenario and launch, compile nothing")
    parser.add_argument("--out", type=Path, default=None, help="save JSON and markdown here (bench/results)")
    args = parser.parse_args(argv)

    import triton
    started = time.time()
    archs = [int(a) for a in args.archs.split(",")] if args.archs else supported_archs()
    launches = capture(args.set == "full", archs)
    if args.only:
        pattern = re.compile(args.only)
        launches = [x for x in launches if pattern.search(" ".join([x.kernel, x.constexpr_text()] + x.labels))]
    listed_archs = None
    if args.listed_archs == "none":
        listed_archs = []
        launches = [x for x in launches if not listed_only(x)]
    elif args.listed_archs:
        listed_archs = [int(a) for a in args.listed_archs.split(",")]
    print(f"triton {triton.__version__}: {len(launches)} launch configurations captured in "
          f"{time.time() - started:.1f} s; compiling for {', '.join(f'sm_{a}' for a in archs)}", flush=True)
    if args.roofline:
        md = roofline_tables(launches, roofline_arch(archs))
        print(md)
        if args.out:
            from bench.core import context
            date = context("cpu")["date"]
            args.out.mkdir(parents=True, exist_ok=True)
            stem = args.out / f"roofline_triton{triton.__version__.replace('.', '-')}_{date[:10]}"
            stem.with_suffix(".md").write_text(
                f"# Roofline of every captured launch (triton {triton.__version__}, {date})\n\n"
                f"`python -m tools.compile_gpu --roofline --archs {','.join(map(str, archs))}`: a model of the work, "
                f"nothing compiled or run.\n\n{md}\n")
            stem.with_suffix(".json").write_text(json.dumps(
                {"triton": triton.__version__, "date": date, "archs": archs,
                 "launches": [{"kernel": x.kernel, "configuration": x.constexpr_text(), "roofline": roofline_of(x)}
                              for x in launches if x.work]}, separators=(",", ":")))
            print(f"saved {stem}.md and .json")
        return 0
    if args.list:
        for i, launch in enumerate(launches):
            roles = ", ".join(f"sm_{a} {r}" for a, r in sorted(launch.roles.items()))
            print(f"[{i}] {launch.kernel} {launch.constexpr_text()} ({roles})")
            for label in launch.labels:
                print(f"      {label}")
        return 0
    results = compile_all(launches, archs, args.jobs, listed_archs=listed_archs)
    fresh = sum(1 for r in results.values() if not r.get("cached"))
    elapsed = time.time() - started
    md = table(launches, results, archs)
    print(md)
    worst = worst_by_kernel(launches, results, archs)
    print("\nWorst default launch per kernel:\n" + worst)
    failures = verdicts(launches, results, archs, args.budget)
    summary = (f"{len(results)} compiles ({fresh} fresh, {len(results) - fresh} cached) in {elapsed:.0f} s; "
               f"{len(failures)} problems (budget {args.budget} B of spill stores)")
    print("\n" + summary)
    for line in failures:
        print("  " + line)
    if args.out:
        from bench.core import context
        data = {"machine": context("cpu"), "triton": triton.__version__, "archs": archs, "budget": args.budget,
                "set": args.set, "seconds": elapsed, "fresh_compiles": fresh, "problems": failures,
                "launches": [{"kernel": x.kernel, "configuration": x.constexpr_text(), "roles": {str(a): r for a,
                                                                                                 r in x.roles.items()},
                              "labels": x.labels, "results": {str(a): results.get((i, a)) for a in archs},
                              "roofline": roofline_of(x)}
                             for i, x in enumerate(launches)]}
        header = (f"# Ahead-of-time compile check (triton {triton.__version__}, {data['machine']['date']})\n\n"
                  f"`python -m tools.compile_gpu --set {args.set}`: {summary}.\n\n")
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"compile_gpu_triton{triton.__version__.replace('.', '-')}_{data['machine']['date'][:10]}"
        stem.with_suffix(".json").write_text(json.dumps(data, indent=2))
        stem.with_suffix(".md").write_text(header + "Worst default launch per kernel:\n\n" + worst + "\n\n" + md
                                           + "\n\n" + "\n".join(f"- {f}" for f in failures) + "\n\n"
                                           + roofline_tables(launches, roofline_arch(archs)) + "\n")
        print(f"saved {stem}.json and .md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
