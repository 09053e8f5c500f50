"""The work of each of our Triton launches, read from its arguments: the FLOP of its products, the
bytes it must move at least, the precision its products run in, and the roofline that gives
(`bench.peaks.roofline`).

    with recording(lambda call: ...):   # call.kernel, call.args (by name), call.work()
        model(x)

The compile check (tools/compile_gpu.py) adds up the work per launch configuration and scenario on
`meta` tensors; on a GPU the benchmarks' launch log (`bench.benchmarks.kernels.LaunchLog`) puts the
predicted time of what a call launched next to its measured time.

What is counted. FLOP: 2 per multiply-add of the products (a convolution's every tap, padding
included, as torch's FlopCounterMode counts it; a transposed convolution's taps that land in the
kept window; the codebook search's 2 N K D per stage), once, with the passes of a split precision
(tf32x3, bf16x3) in `passes`; elementwise kernels count one operation per element on CUDA cores.
Bytes: each tensor argument read or written once (the stand-in pointers a kernel receives for an
absent bias or residual counted once), the codebooks, their norms and the stage inputs only for the
stages a launch runs. Not counted: the certified search's rescoring of the rows its bound cannot
decide (measured per input, `ops.rvq` stats), re-reads that miss the caches, launch overhead.
"""

import contextlib
import typing as tp

import torch

from bench.peaks import DOT_PASSES, bound, roofline


class Work(tp.NamedTuple):
    flop: float
    bytes: float
    peak: str      # 'fp32', 'tf32', 'bf16': the dense peak the products run at
    passes: int    # tensor-core passes per product (3 for tf32x3 and bf16x3)

    def predicted(self) -> tp.Dict[str, float]:
        """predicted_ms_h100, predicted_ms_h200 (`bench.peaks.roofline`)."""
        return roofline(self.flop, self.bytes, self.peak, self.passes)

    def roofline(self) -> tp.Dict[str, tp.Any]:
        """`predicted` and what bounds it on the H100 ('compute' or 'memory')."""
        return dict(self.predicted(), bound=bound(self.flop, self.bytes, self.peak, self.passes))


class Call(tp.NamedTuple):
    kernel: str                      # the @triton.jit function's name
    args: tp.Dict[str, tp.Any]       # every argument by name (constexprs and launch options included)

    def work(self) -> tp.Optional[Work]:
        return work(self.kernel, self.args)


def bind(fn, args: tp.Sequence[tp.Any], kwargs: tp.Dict[str, tp.Any]) -> tp.Dict[str, tp.Any]:
    """A launch's arguments by name: positional ones by the kernel's parameter names, then keywords."""
    names = list(getattr(fn, "arg_names", ()))
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _is_tensor(value) -> bool:
    return isinstance(value, torch.Tensor)


def _nbytes(t) -> float:
    return float(t.numel() * t.element_size())


def tensor_bytes(a: tp.Dict[str, tp.Any], fractions: tp.Optional[tp.Dict[str, float]] = None) -> float:
    """Bytes of every distinct tensor argument (one object passed twice counts once), each scaled by
    `fractions[name]` where a launch touches only part of it."""
    fractions = fractions or {}
    seen: tp.Dict[int, float] = {}
    for name, value in a.items():
        if _is_tensor(value):
            seen[id(value)] = max(seen.get(id(value), 0.0), _nbytes(value) * fractions.get(name, 1.0))
    return sum(seen.values())


def dot_passes(a: tp.Dict[str, tp.Any]) -> tp.Tuple[int, str]:
    """(passes, peak) of a launch's products: half operands on bf16/fp16 tensor cores, else its
    PRECISION ('ieee' on CUDA cores)."""
    if a.get("HALF_DOT"):
        return 1, "bf16"
    return DOT_PASSES[a.get("PRECISION", "ieee")]


def transposed_taps(L: int, K: int, S: int, start: int, length: int) -> int:
    """How many (input position j < L, tap k < K) pairs of a transposed convolution of stride S land
    at an output position j S + k inside [start, start + length)."""
    total = 0
    for k in range(K):
        lo = max(0, -(-(start - k) // S))
        hi = min(L - 1, (start + length - 1 - k) // S)
        total += max(0, hi - lo + 1)
    return total


def _block_flop(a, L: int, B: int) -> float:
    """The fused residual block's products over L positions: K-tap conv C -> H, 1x1 conv H -> C, and
    the 1x1 shortcut C -> C where it has one."""
    C, H = a["C"], a["H"]
    return 2.0 * B * L * (a["K"] * C * H + H * C + (C * C if a.get("SHORTCUT") else 0))


def _conv1d(a):
    return 2.0 * a["out_ptr"].shape[0] * a["T_out"] * a["C_in"] * a["C_out"] * a["K"]


def _conv_transpose1d(a):
    taps = transposed_taps(a["L"], a["K"], a["S"], a["start"], a["length"])
    return 2.0 * a["out_ptr"].shape[0] * a["C_in"] * a["C_out"] * taps


def _conv2d(a, out="out_ptr"):
    return 2.0 * a[out].shape[0] * a["C_out"] * a["H_out"] * a["W_out"] * a["C_in"] * a["KH"] * a["KW"]


def _weight_grad(a):
    taps = a["part_ptr"].shape[1]  # one program column per tap: KH * KW
    return 2.0 * a["N"] * taps * a["C_in"] * a["C_out"]


def _residual_block(a):
    return _block_flop(a, a["L"], a["out_ptr"].shape[0])


def _block_down(a):
    B = a["out_ptr"].shape[0]
    return _block_flop(a, a["L"], B) + 2.0 * B * a["T_out"] * a["KD"] * a["C"] * a["C_out"]


def _up_block(a):
    B = a["out_ptr"].shape[0]
    taps = transposed_taps(a["L_in"], a["K_U"], a["S"], a["start"], a["length"])
    return 2.0 * B * a["C_in"] * a["C"] * taps + _block_flop(a, a["length"], B)


def _search(a):
    return 2.0 * a["N"] * a["K"] * a["D"] * a.get("n_q", 1)


def _stage_fractions(a, stages: int, names: tp.Sequence[str]) -> tp.Dict[str, float]:
    """The share of each stacked-per-stage tensor (first dimension: stages) a launch of `stages` reads."""
    return {n: min(1.0, stages / max(1, a[n].shape[0])) for n in names if _is_tensor(a.get(n)) and a[n].dim() >= 2}


def _search_fractions(a, stages: int) -> tp.Dict[str, float]:
    """The searches' stacked tensors: the codebooks the products read (the fp32 ones, or their bf16
    halves where the operands are split ahead: then the fp32 ones only for rescoring, not counted)."""
    fractions = _stage_fractions(a, stages, ("cb_ptr", "hi_ptr", "lo_ptr", "norm_ptr"))
    if a.get("SPLIT"):
        fractions["cb_ptr"] = 0.0
    return fractions


# kernel name -> (FLOP of its products, whether they are dot products (else elementwise, CUDA cores),
#                 the fractions of its stacked tensors it touches, or None: every tensor whole)
_MODELS: tp.Dict[str, tp.Tuple[tp.Callable, bool, tp.Optional[tp.Callable]]] = {
    "_conv1d_kernel": (_conv1d, True, None),
    "_conv1d_gemm_kernel": (_conv1d, True, None),
    "_conv_transpose1d_kernel": (_conv_transpose1d, True, None),
    "_conv_transpose1d_gemm_kernel": (_conv_transpose1d, True, None),
    "_conv2d_leaky_relu_kernel": (_conv2d, True, None),
    "_conv2d_gemm_kernel": (_conv2d, True, None),
    "_conv2d_input_grad_gemm_kernel": (lambda a: _conv2d(a, "dx_ptr"), True, None),
    "_conv2d_weight_grad_gemm_kernel": (_weight_grad, True, None),
    "_residual_block_kernel": (_residual_block, True, None),
    "_block_down_kernel": (_block_down, True, None),
    "_up_block_kernel": (_up_block, True, None),
    "_rvq_encode_kernel": (_search, True, lambda a: _search_fractions(a, a["n_q"])),
    "_rvq_train_kernel": (_search, True, lambda a: _search_fractions(a, a["n_q"])),
    "_vq_assign_kernel": (_search, True, None),
    "_rvq_decode_kernel": (lambda a: float(a["N"] * a["D"] * a["n_q"]), False,
                           lambda a: _stage_fractions(a, a["n_q"], ("cb_ptr",))),
    "_rvq_train_backward_kernel": (lambda a: 3.0 * a["N"] * a["D"] * a["stages"], False,
                                   lambda a: _stage_fractions(a, a["stages"], ("cb_ptr", "codes_ptr", "inputs_ptr"))),
    "_segment_sums_kernel": (lambda a: float(a["x_ptr"].numel()), False, None),
    "_scaled_copy_kernel": (lambda a: float(a["numel"]), False, None),
    "_leaky_relu_grad_kernel": (lambda a: float(a["numel"]), False, None),
}


def modelled() -> tp.Tuple[str, ...]:
    """The kernels `work` knows."""
    return tuple(_MODELS)


def work(kernel: str, a: tp.Dict[str, tp.Any]) -> tp.Optional[Work]:
    """The work of one launch of `kernel` with arguments `a` (by name), or None for a kernel this
    model does not know."""
    model = _MODELS.get(kernel)
    if model is None:
        return None
    flop_of, dot, fractions = model
    passes, peak = dot_passes(a) if dot else (1, "fp32")
    return Work(float(flop_of(a)), tensor_bytes(a, fractions(a) if fractions else None), peak, passes)


def accumulate(entry: tp.Dict[str, tp.Any], work: Work) -> tp.Dict[str, tp.Any]:
    """Adds one launch's work to `entry`: calls, flop, bytes, and each call's roofline
    (predicted_ms_h100, predicted_ms_h200) added, as launches run one after another."""
    entry["calls"] = entry.get("calls", 0) + 1
    entry["flop"] = entry.get("flop", 0.0) + work.flop
    entry["bytes"] = entry.get("bytes", 0.0) + work.bytes
    for name, value in work.predicted().items():
        entry[name] = entry.get(name, 0.0) + value
    return entry


@contextlib.contextmanager
def recording(sink: tp.Callable[[Call], None]):
    """Calls `sink(Call)` for every Triton launch made inside, compiled or interpreted, before it
    runs (so a launch that a cache hook then skips is seen too)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def wrap(original):
        def run(self, *args, grid, warmup, **kwargs):
            if not warmup:
                sink(Call(self.fn.__name__, bind(self, args, kwargs)))
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return run

    for cls, original in originals.items():
        cls.run = wrap(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.run = original
