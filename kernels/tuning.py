"""Launch configurations: one no-spill default per launch, and on a GPU an optional autotuned list.

Each kernel wrapper computes a default configuration (block sizes, num_warps, num_stages) that
compiles without register spills for every layer of both models (`tools/compile_gpu.py`), and
names a short list of other configurations worth timing. With `ENCODEC_FAST_AUTOTUNE=1` on a GPU,
`launch` hands that list (default first) to `triton.autotune`, which times each on the first call
and keeps the fastest for the rest of the process. The tuning key is the kernel's shape arguments
(channels, kernel size, codebook size...), the tensors' dtypes and a size class of the launch
(the number of rows or output positions, in powers of 16), so a 1-frame streaming call and a
48,000-frame batch are tuned apart, while files of similar lengths share a choice.

Autotuning is off by default: it costs seconds per new shape (each configuration compiled and
timed), and with exact fp32 different block sizes can order a tie's comparisons differently, so
a rerun could give another code on an exact tie. Under Triton's interpreter it never runs: the
defaults are used there and when it is off.
"""

import math
import os
import typing as tp

import triton

from ..ops.backend import interpreting

#: (kernel function, size class, configurations) -> triton Autotuner
_TUNERS: tp.Dict[tp.Tuple[tp.Any, int, tp.Tuple[str, ...]], tp.Any] = {}


def target_arch() -> int:
    """The compute capability of the GPU Triton compiles for, as 80, 90, 100... (what the active
    driver reports: the current CUDA device, or the stand-in of tools/compile_gpu.py)."""
    from triton.runtime import driver
    active = driver.active
    key = (id(active), active.get_current_device())
    arch = _ARCHS.get(key)
    if arch is None:
        arch = _ARCHS[key] = int(active.get_current_target().arch)
    return arch


_ARCHS: tp.Dict[tp.Tuple[int, int], int] = {}
#: Triton >= 3.7 compiles our loops with more registers than 3.6 (tools/compile_gpu.py): some
#: configurations that fit 3.6's registers spill with 3.9, so the tables below differ.
TRITON_3_7 = tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit()) >= (3, 7)


#: Floating-point contraction (a * b + c as one FMA) in every launch, pinned: it changes the bits of
#: ELU, of `norm - 2 * dot` and of residual updates, and Triton's default for it (on through 3.9,
#: with a warning in 3.9 when TRITON_DEFAULT_FP_FUSION is unset) turns off in 3.10. Every launch passes
#: `LAUNCH_OPTIONS`; the interpreter ignores it (numpy rounds every operation).
FP_FUSION = True
LAUNCH_OPTIONS = {"enable_fp_fusion": FP_FUSION}


def autotune_enabled() -> bool:
    """$ENCODEC_FAST_AUTOTUNE is 1/true/on and kernels run on a GPU (never in the interpreter)."""
    return os.environ.get("ENCODEC_FAST_AUTOTUNE", "0").lower() in ("1", "true", "on", "yes") and not interpreting()


def size_class(n: int) -> int:
    """Launch sizes grouped by powers of 16: 1-15 -> 0, 16-255 -> 1, 256-4095 -> 2, ..."""
    return int(math.log2(max(n, 1))) // 4


def config(blocks: tp.Dict[str, int], num_warps: int, num_stages: int) -> "triton.Config":
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)


def candidates(default: "triton.Config", listed: tp.Sequence["triton.Config"],
               clamp: tp.Callable[[tp.Dict[str, int]], tp.Dict[str, int]]) -> tp.List["triton.Config"]:
    """The default first, then the listed configurations with block sizes clamped to the launch
    (a 64-row block for a 1-channel output is a 16-row one), without repeats."""
    out, seen = [], set()
    for c in [default, *listed]:
        kwargs = clamp(dict(c.kwargs))
        ident = (tuple(sorted(kwargs.items())), c.num_warps, c.num_stages)
        if ident not in seen:
            seen.add(ident)
            out.append(config(kwargs, c.num_warps, c.num_stages))
    return out


def launch(kernel, grid: tp.Callable[[tp.Dict[str, int]], tp.Tuple[int, ...]], args: tp.Sequence[tp.Any],
           constants: tp.Dict[str, tp.Any], default: "triton.Config",
           listed: tp.Sequence["triton.Config"] = (), key: tp.Sequence[str] = (), size: int = 1,
           extents: tp.Optional[tp.Dict[str, int]] = None, reset_to_zero: tp.Sequence[str] = ()) -> None:
    """Launch `kernel` with the default configuration, or through the autotuner when it is on.

    grid: a function of the configuration's block sizes; constants: the kernel's other constexpr
    arguments; listed: the other configurations (built once by the caller, not per launch);
    key: argument names whose values select a tuning (dtypes are added by Triton); size: the
    launch's size for `size_class`; extents: {block name: the launch's extent along it}, listed
    block sizes are clamped to max(16, next power of 2 of it); reset_to_zero: outputs accumulated
    with atomics, zeroed before each timed configuration."""
    if autotune_enabled() and listed:
        caps = {name: max(16, triton.next_power_of_2(n)) for name, n in (extents or {}).items()}
        configs = candidates(default, listed,
                             lambda kw: {name: min(value, caps.get(name, value)) for name, value in kw.items()})
        if len(configs) > 1:
            ident = (kernel, size_class(size), tuple(str(c) for c in configs))
            tuner = _TUNERS.get(ident)
            if tuner is None:
                tuner = _TUNERS[ident] = triton.autotune(configs=configs, key=list(key),
                                                         reset_to_zero=list(reset_to_zero) or None)(kernel)
            tuner[grid](*args, **constants, **LAUNCH_OPTIONS)
            return
    kernel[grid(default.kwargs)](*args, **constants, **default.kwargs, num_warps=default.num_warps,
                                 num_stages=default.num_stages, **LAUNCH_OPTIONS)


def chosen() -> tp.List[tp.Dict[str, tp.Any]]:
    """What the autotuner picked so far: kernel, size class, key, configuration (for reports)."""
    rows = []
    for (kernel, cls, _), tuner in _TUNERS.items():
        for key, best in tuner.cache.items():
            rows.append({"kernel": kernel.__name__, "size_class": cls, "key": [str(k) for k in key],
                         "config": {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}})
    return rows
